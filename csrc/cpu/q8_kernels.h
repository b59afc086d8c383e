// Integer dot-product kernels on quantized activations ("q8" kernels), the
// internal interface between the driver (q8_driver.cpp, baseline code) and
// the kernels compiled once per SIMD level (q8_scalar.cpp, q8_avx2.cpp,
// q8_avxvnni.cpp, q8_avx512.cpp, the last three from q8_impl.inc).
//
// Each call quantizes x once, row by row, to int8 per block of 32 (256 for
// the k-quants) and takes integer dot products of those codes with the
// weight's integer codes (vpmaddubsw / vpdpbusd), applying the float scales
// per block:
//   * GGUF types: exactly llama.cpp's scheme. x becomes Q8_0 (Q4_0, Q5_0,
//     Q8_0), Q8_1 (Q4_1, Q5_1) or Q8_K (k-quants) blocks, quantized as ggml's
//     x86 code does; each block's integer dot product is the one ggml's
//     vec_dot computes, scaled by fp32(d_w) * fp32(d_x).
//   * Int and NF4: x per 32-block with an fp32 scale d = amax / 127 (not
//     rounded to fp16; at g64 / g128 / g256 the amax of the weight's whole
//     group, see int_act_span), in two int8 planes (x ~ d (q + q2 / 256), kQ8x2_32):
//     each dot product is taken with both and combined as 256 i + i2. Int:
//     y = sum_g s_g (sum_b d_b q.x_b - z_g sum_b d_b sum(x_b)). NF4: the
//     codebook in two int8 planes too, 127 c ~ c8 + r8 / 256 (kNf4CodebookI8,
//     kNf4CodebookR8), and per block 256 c8.q + c8.q2 + r8.q (the r8.q2 / 256
//     term, ~1e-5 of the sum, dropped), times d absmax / (127 * 256).
// Only the float summation order differs between levels (and from ggml).
#pragma once
#include <cstdint>

#include "int_kernels.h"
#include "lora_epilogue.h"
#include "nf4_kernels.h"
#include "pyquant/gguf_blocks.h"

namespace pyquant {
namespace q8 {

constexpr int kBlock = 32;    // activation block of Q8_0 / Q8_1 / Int / NF4
constexpr int kSuper = 256;   // Q8_K block
constexpr int kGgufTypes = 15;  // ggml type codes 0..14

// How x is quantized.
enum class ActKind : int {
  kQ8_0 = 0,   // ggml Q8_0: d rounded to fp16, q = rint(x * 127 / amax) (s = d * sum q)
  kQ8_1 = 1,   // ggml Q8_1: Q8_0 plus s = fp16(d * sum q)
  kQ8_K = 2,   // ggml Q8_K: per 256, d = max / -127 (fp32), bsums per 16
  kQ8_32 = 3,  // Q8_0 with the fp32 d
  // Int / NF4: two int8 planes, x ~ d * (q + q2 / 256): q as kQ8_32, q2 the
  // residual x - d q (one rounding) times 256 / d, rounded, clamped to +-127.
  // A single plane measured up to 3% off the exact product on SmolLM2's
  // layers with outlier activations; two planes ~1e-4 (cpu_int8_error.py).
  kQ8x2_32 = 4,
};

// 32-blocks of x that share one scale (Acts::span) for an Int weight: a
// whole group at g64, g128 and g256 (every width), else 1. The kernels then
// add a group's integer dot products before one conversion and one FMA with
// s_g d_g, where a scale per 32-block took a conversion, a multiply and an FMA
// per unit of codes:
//   * avx2 / avxvnni, one or two rows of x (more: their sums outgrew the 16
//     registers, slower): 4 bits at g64-g256 (int16 sums on vpmaddubsw stay
//     exact: at most 4 pairs x 2 x 2 x 15 x 127 = 30480 per lane), Int4 g128
//     M = 1 1.04-1.14x on Zen 3 (at one row of x and 8 or more whole groups,
//     q8_impl.inc's int4_row_group_scales also converts 8 groups' scales at
//     once: 1.12-1.43x more on Zen 5 at these levels); 2, 3 and 8 bits at
//     g128 / g256 (int32 sums), on Zen 5 at these levels, 4096 x 4096,
//     M = 1-2, 1.11-1.61x.
//   * avx512, every pass size: 4 bits at g128 / g256 (a g64 group is half of
//     its 128-code unit and keeps the lane scales), Zen 5, warm, M = 1-4,
//     1.12-1.23x (g128) and 1.44-1.46x (g256); 2, 3 and 8 bits at g64-g256
//     (64-code units), 4096 x 4096, 1.01-1.11x (g64), 1.25-1.47x (g128),
//     1.34-1.84x (g256).
// x's two planes keep 15 bits of the group's largest value: the product
// stays within 3.4e-4 of the exact one on SmolLM2's layers (1.2e-4 with a
// scale per 32-block; cpu_int8_error.py).
int int_act_span(int64_t group_size);

// Order of the int8 codes of x within a row, matched to how a kernel
// unpacks its weight bytes (so the weight side needs no shuffles). The row
// is cut into groups of `group` elements; the rest (< group) stays natural.
enum class Layout : int {
  kNatural = 0,
  kHalves2 = 1,  // per 64: elements 0-15 of both 32-blocks, then 16-31 of both (Int4, 256-bit)
  kHalves4 = 2,  // per 128: elements 0-15 of four 32-blocks, then 16-31 of the four (Int4, 512-bit)
  kEvenOdd64 = 3,   // per 64: the 32 even elements, then the 32 odd ones (NF4, 256-bit)
  kEvenOdd128 = 4,  // per 128: the 64 even, then the 64 odd (NF4, 512-bit)
  // per 128: 32-blocks 0, 2, 1, 3 (Q4_K / Q5_K, 512-bit): a 64-byte load of
  // their codes holds blocks 0 and 2 in its low nibbles, 1 and 3 in its high
  kBlocks0213 = 5,
  // per 512 (two 256-blocks; Q4_K / Q5_K at one row of x, 256-bit): 16-value pieces
  // of the two blocks alternating (first's 0-15, second's 0-15, first's
  // 16-31, ...), so a 32-byte load is one vector of the two-block kernel; an
  // odd last 256-block natural
  kBlockPairs16 = 6,
  // per 128 as kHalves4, the last K % 128 natural (the GGUF 32-block types:
  // four blocks a unit, the one to three left over one at a time)
  kHalves4ThenNatural = 7,
};

// Quantized activations: m rows of kp bytes (K padded to the block), the
// per-block data, and `dl`: for every 4-byte lane of qs (in layout order),
// the scale d of the 32-block those 4 codes come from, so kernels scale an
// int32 lane vector with one load whatever the layout.
struct Acts {
  int64_t m = 0, k = 0, kp = 0, nb = 0;  // nb: blocks per row (32 or 256)
  ActKind kind = ActKind::kQ8_32;
  Layout layout = Layout::kNatural;
  int span = 1;  // kQ8x2_32: consecutive 32-blocks (from the row's start) whose d is their common amax / 127
  int8_t* qs = nullptr;       // (m, kp)
  int8_t* qs2 = nullptr;      // (m, kp) kQ8x2_32: the second plane, same order
  float* d = nullptr;         // (m, nb) scale as kernels multiply it
  float* s = nullptr;         // (m, nb) Q8_1: fp16(d * sum q) as fp32; Q8_0, Q8_32: d * isum (fp32);
                              // Q8x2_32: d / 256 * isum
  int32_t* isum = nullptr;    // (m, nb) sum of the codes of a 32-block (Q8x2_32: of 256 q + q2)
  int32_t* isum1 = nullptr;   // (m, nb) kQ8x2_32: sum of the first plane's codes q
  int32_t* corr = nullptr;    // (m, nb) NF4's 512-bit kernel: its dot products' starting value per block
  int16_t* bsums = nullptr;   // (m, kp / 16) Q8_K: sum of every 16 codes
  float* dl = nullptr;        // (m, kp / 4) Q8_32: lane scales (see above); Q8x2_32: d / 256

  const int8_t* qs_row(int64_t r) const { return qs + r * kp; }
  const int8_t* qs2_row(int64_t r) const { return qs2 + r * kp; }
  const int32_t* isum1_row(int64_t r) const { return isum1 + r * nb; }
  const int32_t* corr_row(int64_t r) const { return corr + r * nb; }
  const float* d_row(int64_t r) const { return d + r * nb; }
  const float* s_row(int64_t r) const { return s + r * nb; }
  const int32_t* isum_row(int64_t r) const { return isum + r * nb; }
  const int16_t* bsums_row(int64_t r) const { return bsums + r * (kp / 16); }
  const float* dl_row(int64_t r) const { return dl + r * (kp / 4); }
};

// A GGUF weight: n rows of k / block_size blocks.
struct GgufWeight {
  int type;
  const uint8_t* blocks;
  int64_t n, k, row_bytes;
};

// Int: the packed weight plus, per row of x, X[g] = sum over group g of
// d_b * sum(q_b) (the zero-point term is sum_g s_g z_g X[g]).
struct IntArgs {
  const IntWeight* w;
  const float* xg;  // (m, w->groups)
};

// Rows [n0, n1) of y[m0 .. m0 + mr) = q8 product (no bias); y is (M, ldy);
// 1 <= mr <= the table's mr_* for the family.
using GgufRowsFn = void (*)(const GgufWeight& w, const Acts& a, int64_t m0, int mr, int64_t n0, int64_t n1,
                            float* y, int64_t ldy);
using IntRowsFn = void (*)(const IntArgs& w, const Acts& a, int64_t m0, int mr, int64_t n0, int64_t n1, float* y,
                           int64_t ldy);
using Nf4RowsFn = void (*)(const nf4cpu::Weight& w, const Acts& a, int64_t m0, int mr, int64_t n0, int64_t n1,
                           float* y, int64_t ldy);
// Fills a.qs / qs2 / d / s / isum / isum1 / bsums / dl (those allocated) from x
// (m, k) in x_dtype (fp32 / fp16 / bf16; row stride k).
using QuantizeFn = void (*)(const void* x, int x_dtype, Acts& a);

// The kernels of one SIMD level.
struct Table {
  QuantizeFn quantize;
  int mr_gguf, mr_int, mr_nf4;  // most rows of x one call of a rows function takes (sharing one weight decode)
  GgufRowsFn gguf[kGgufTypes];  // by ggml type code; null: none
  IntRowsFn int_rows[9];        // by bits (2, 3, 4, 8)
  Nf4RowsFn nf4;
  Layout int_layout[9];         // the activation layout each kernel reads
  Layout nf4_layout;
  int nf4_min_group;            // the NF4 kernel needs K % this == 0
  Layout gguf_layout[kGgufTypes];          // the activation layout each GGUF kernel reads
  Layout gguf_layout_one_row[kGgufTypes];  // the same, for a call with one row of x
  // Whether the driver takes long rows of GGUF weights in slices of K (the
  // 512-bit kernels; at the 256-bit levels, compute-bound, slices ran
  // 0.96-0.99x whole rows on Zen 5), and from how many rows of x a pass takes
  // Q4_0's 16-row transposed kernel (0: never), which long rows do not slow
  // (in slices of K: 0.95x), so its passes stay whole.
  bool gguf_k_slices;
  int q4_0_rows16_from;
};

const Table& table_scalar();
#if PQ_X86
const Table& table_avx2();
const Table& table_avxvnni();
const Table& table_avx512();
#endif

// ---- entry points (q8_driver.cpp) -------------------------------------------------
// y (M, N) fp32 = the q8 product of x (M, K; fp32, fp16 or bf16, contiguous)
// and the weight, + bias (fp32 (N,), or null), + the low-rank epilogue.

// Every GGUF type; k a whole number of blocks.
void gguf_qmatmul(int type, const void* x, int x_dtype, int64_t m, const uint8_t* blocks, int64_t n, int64_t k,
                  const float* bias, float* y, int nthreads);
// Every Int format (x already in packed column order when act_order).
void int_qmatmul(const void* x, int x_dtype, int64_t m, const IntWeight& w, const float* bias,
                 const LoraEpilogue& lora, float* y, int nthreads);
// NF4 with k % 32 == 0 (nf4_supported); otherwise the fp32 kernels.
bool nf4_supported(int64_t k);
void nf4_qmatmul(const void* x, int x_dtype, int64_t m, const nf4cpu::Weight& w, const float* bias,
                 const LoraEpilogue& lora, float* y, int nthreads);
// x quantized alone, natural order (for tests): qs / qs2 (m, kp), d / s /
// isum / isum1 (m, nb), bsums (m, kp / 16); any but qs and d may be null.
void quantize_activations(ActKind kind, const void* x, int x_dtype, int64_t m, int64_t k, int8_t* qs, float* d,
                          float* s, int32_t* isum, int16_t* bsums, int8_t* qs2, int32_t* isum1, int span = 1);

// ---- helpers shared by every level (baseline code) ------------------------------

// IEEE binary32 -> binary16 bits, round to nearest even (F16C's _cvtss_sh(x, 0)
// and ggml's software conversion give the same bits).
uint16_t float_to_half_rne(float f);

}  // namespace q8
}  // namespace pyquant
