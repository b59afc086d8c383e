// CPU kernels of the Int format (layout: pyquant/formats/int_format.py).
// Private to csrc/cpu: the entry points int_bindings.cpp calls and the AVX2
// chunk decoder the dequantize, GEMV and GEMM kernels share.
#pragma once
#include <cstdint>

#include "avx2_reduce.h"
#include "lora_epilogue.h"
#include "simd.h"
#include "pyquant/common.h"
#include "pyquant/int_decode.h"
#include "pyquant/static_switch.h"

#if PQ_X86
#include <immintrin.h>
#endif

namespace pyquant {

// A packed Int weight (N, K) as raw pointers; validated in Python. The
// derived sizes are computed once (make) so no kernel divides in a hot loop.
struct IntWeight {
  const uint8_t* qweight;  // (N, row_bytes)
  const void* scales;      // (N, groups) in scale_dtype
  const void* zeros;       // (N, groups) in scale_dtype, or null when symmetric
  int64_t n, k;
  int bits;
  int64_t group_size;  // -1 = one group per row
  int scale_dtype;
  int64_t row_bytes;         // bytes per packed row
  int64_t chunks;            // 32-code chunks per row
  int64_t chunks_per_group;  // group sizes are multiples of the chunk, so a
                             // chunk never straddles two groups; a
                             // per-channel row is one group of every chunk
  int64_t groups;
  // Groups a row has in scales / zeros (and in the q8 kernels' X): `groups`,
  // except in a slice of K (q8_driver.cpp), whose groups are a row's middle.
  int64_t group_stride;

  static IntWeight make(const uint8_t* qweight, const void* scales, const void* zeros, int64_t n, int64_t k, int bits,
                        int64_t group_size, int scale_dtype) {
    IntWeight w{qweight, scales, zeros, n, k, bits, group_size, scale_dtype, 0, 0, 0, 0, 0};
    w.row_bytes = int_row_bytes(k, bits);
    w.chunks = (k + kIntChunk - 1) / kIntChunk;
    w.chunks_per_group = group_size < 0 ? w.chunks : group_size / kIntChunk;
    w.groups = group_size < 0 ? 1 : (k + group_size - 1) / group_size;
    w.group_stride = w.groups;
    return w;
  }
  float scale(int64_t row, int64_t g) const { return load_float(scales, row * group_stride + g, scale_dtype); }
  float zero(int64_t row, int64_t g) const {
    return zeros ? load_float(zeros, row * group_stride + g, scale_dtype) : float(1 << (bits - 1));
  }
};

// Entry points (int_dequant.cpp, int_qmatmul.cpp).
void int_unpack(const uint8_t* qweight, int64_t n, int64_t k, int bits, uint8_t* out, int nthreads);
// out (N, K) fp32 = (float(q) - z) * s, columns scattered by perm (int32 (K,)) when given.
void int_dequantize(const IntWeight& w, const int32_t* perm, float* out, int nthreads);
// y (M, N) fp32 = x (M, K) contiguous, in x_dtype (fp32/fp16/bf16, read as
// fp32) @ W_hat.T (+ bias fp32 (N,) when given) (+ the low-rank epilogue).
void int_qmatmul(const void* x, int x_dtype, int64_t m, const IntWeight& w, const float* bias,
                 const LoraEpilogue& lora, float* y, int nthreads);

// y = x @ W_hat.T + bias (bias may be null).
// Small-M path (int_gemv.cpp): x is (M, ldx) in x_dtype, read up to column K.
void int_gemv_avx2(const void* x, int x_dtype, int64_t ldx, int64_t m, const IntWeight& w, const float* bias,
                   const LoraEpilogue& lora, float* y, int nthreads);
// Tiled GEMM path (int_gemm.cpp): x is fp32 (M, ldx) with ldx >= chunks * 32
// and zeros past K, so whole chunks can be read.
void int_gemm_avx2(const float* x, int64_t ldx, int64_t m, const IntWeight& w, const float* bias,
                   const LoraEpilogue& lora, float* y, int nthreads);
// Int4 with bf16 x on AVX512-BF16 (int4_bf16.cpp): exact products of bf16 x
// with the codes (vdpbf16ps), summed in fp32. int_qmatmul takes it where
// int4_bf16_route says: bf16 x of up to kInt4Bf16MaxM rows, 4 bits, the
// avx512 level on a CPU with AVX512-BF16. (4096 x 4096, 2 threads: 1.2-1.4x
// torch's int4 kernel and 1.3-1.5x the int8 planes at M = 4-8, level with
// them at M = 1; above 64 rows the outer-product GEMM ties with it and x
// would no longer stay in L2.)
bool int4_bf16_supported(const IntWeight& w);
constexpr int64_t kInt4Bf16MaxM = 64;
inline bool int4_bf16_route(int x_dtype, int64_t m, const IntWeight& w) {
  return x_dtype == kBF16 && m <= kInt4Bf16MaxM && int4_bf16_supported(w);
}
void int4_bf16_qmatmul(const uint16_t* x, int64_t m, const IntWeight& w, const float* bias, const LoraEpilogue& lora,
                       float* y, int nthreads);
// Int4 with fp32 x at small M on AVX-512 (int4_table.cpp): the codes index a
// table of the group's 16 dequantized values (vpermps), each product x times
// the reference's W_hat. int_qmatmul takes it for fp32 x of up to
// kInt4TableMaxM rows, 4 bits, K a multiple of 32, the avx512 level.
bool int4_table_supported(const IntWeight& w);
constexpr int64_t kInt4TableMaxM = 8;
inline bool int4_table_route(int x_dtype, int64_t m, const IntWeight& w) {
  return x_dtype == kF32 && m <= kInt4TableMaxM && int4_table_supported(w);
}
void int4_table_qmatmul(const float* x, int64_t m, const IntWeight& w, const float* bias, const LoraEpilogue& lora,
                        float* y, int nthreads);
constexpr int64_t kGemvMaxM = 4;      // rows of x per GEMV pass
constexpr int64_t kGemvPassMaxM = 8;  // up to here qmatmul runs GEMV passes
// Rows of x per call of the tiled GEMM: its x panel (rows x 512 fp32, 512 KiB)
// then stays in L2 while a super-tile's weight tiles sweep it. Unblocked, a
// large M streamed x from L3 for every tile (4096 x 4096 at M = 1024, 2
// threads: 0.96x dense fp32; in blocks of 256, 1.07x). Each block decodes W
// again, about 2% of its GEMM.
constexpr int64_t kGemmBlockM = 256;

// The backward's transposed product (int_transposed.cpp): out (M, K) fp32 =
// g (M, N) fp32 @ W_hat, columns in stored order (act_order is undone by the
// caller), without materialising W_hat.
void int_qmatmul_t(const float* g, int64_t m, const IntWeight& w, float* out, int nthreads);
// out (N, k1 - k0) fp32 = stored columns [k0, k1) of W_hat; k0 is a multiple
// of the 32-code chunk, k1 one too or K.
void int_decode_panel(const IntWeight& w, int64_t k0, int64_t k1, float* out, int nthreads);

#if PQ_X86
// Element i of an fp32, fp16 or bf16 array (scales, zeros, a row of x) as
// fp32, fp16 through F16C; the AVX2 kernels' scalar reads, q8's included.
// The portable load_float converts fp16 in software (some 30 instructions
// and a loop for subnormals): a scale and a zero read that way cost a 4-bit
// GEMV about as much as the group's 128 products, and the transposed
// product, which reads them per 32-code chunk, several times its decode.
// Exact either way. No call for any dtype: GCC kept load_float out of line,
// and every vector register is caller-saved, so the call (taken only for bf16
// and fp32 scales) made the AVX-512 Int4 loops keep their accumulators on the
// stack, one store and reload per unit, for fp16 scales too.
PQ_TARGET_AVX2 inline float load_float_avx2(const void* p, int64_t i, int dtype) {
  if (dtype == kF16) return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
  if (dtype == kBF16) return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}
// Elements i .. i + count - 1 of such an array (count 0 to 16, more taken as
// 16) as fp32 lanes, the rest 0: masked loads, nothing past them is read.
// The AVX-512 Int4 kernels' group scales and zeros, 16 groups at a time.
PQ_TARGET_AVX512 inline __m512 load16_avx512(const void* p, int64_t i, int64_t count, int dtype) {
  const __mmask16 k = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  if (dtype == kF32) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(p) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(p) + i);
  if (dtype == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// Elements i .. i + 7 of such an array as fp32 (exact conversions).
PQ_TARGET_AVX2 inline __m256 load8_avx2(const void* p, int64_t i, int dtype) {
  const __m128i* h = reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i);
  if (dtype == kF16) return _mm256_cvtph_ps(_mm_loadu_si128(h));
  if (dtype == kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(h)), 16));
  return _mm256_loadu_ps(static_cast<const float*>(p) + i);
}
// Elements i .. i + count - 1 (count 1 to 8) of an array of `total` as fp32
// lanes 0 .. count - 1, the other lanes 0: a row's last few group scales in
// one vector. Eight are read in place where they lie inside the array (the
// lanes past count, another row's values, then masked off: whatever they
// hold, Inf included, leaves a 0), else through a zero-filled copy.
PQ_TARGET_AVX2 inline __m256 load_upto8_avx2(const void* p, int64_t i, int64_t count, int64_t total, int dtype) {
  if (i + 8 <= total) {
    return _mm256_and_ps(load8_avx2(p, i, dtype), _mm256_castsi256_ps(lanes_below_avx2(count)));
  }
  alignas(32) float t[8] = {};
  for (int64_t j = 0; j < count; ++j) t[j] = load_float_avx2(p, i + j, dtype);
  return _mm256_load_ps(t);
}
PQ_TARGET_AVX2 inline float scale_avx2(const IntWeight& w, int64_t row, int64_t g) {
  return load_float_avx2(w.scales, row * w.group_stride + g, w.scale_dtype);
}
PQ_TARGET_AVX2 inline float zero_avx2(const IntWeight& w, int64_t row, int64_t g) {
  return w.zeros ? load_float_avx2(w.zeros, row * w.group_stride + g, w.scale_dtype) : float(1 << (w.bits - 1));
}

// The 32 codes of one chunk as four int32 vectors: v[0] = codes 0..7,
// v[1] = 8..15, v[2] = 16..23, v[3] = 24..31. Each layout was chosen so a
// zero-extending 8-byte load (vpmovzxbd) plus shifts and masks yields codes
// in order; nothing here needs a shuffle.
template <int BITS>
PQ_TARGET_AVX2 inline void int_decode_chunk_avx2(const uint8_t* c, __m256i v[4]) {
  if constexpr (BITS == 8) {
    for (int t = 0; t < 4; ++t) v[t] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8 * t)));
  } else if constexpr (BITS == 4) {
    // bytes 0..7 hold codes 0..7 (low nibbles) and 16..23 (high nibbles).
    const __m256i mask = _mm256_set1_epi32(0xF);
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
    const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8)));
    v[0] = _mm256_and_si256(b0, mask);
    v[1] = _mm256_and_si256(b1, mask);
    v[2] = _mm256_srli_epi32(b0, 4);
    v[3] = _mm256_srli_epi32(b1, 4);
  } else {  // 2 bits, or the low two bits of 3-bit codes
    const __m256i mask = _mm256_set1_epi32(3);
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
    v[0] = _mm256_and_si256(b, mask);
    v[1] = _mm256_and_si256(_mm256_srli_epi32(b, 2), mask);
    v[2] = _mm256_and_si256(_mm256_srli_epi32(b, 4), mask);
    v[3] = _mm256_srli_epi32(b, 6);
    if constexpr (BITS == 3) {
      // High-bit plane: bit j of a little-endian uint32 is bit 2 of code j.
      uint32_t hbits;
      memcpy(&hbits, c + 8, 4);
      const __m256i h = _mm256_set1_epi32(int(hbits));
      const __m256i one = _mm256_set1_epi32(1);
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      for (int t = 0; t < 4; ++t) {
        const __m256i sh = _mm256_add_epi32(lane, _mm256_set1_epi32(8 * t));
        const __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(h, sh), one);
        v[t] = _mm256_or_si256(v[t], _mm256_slli_epi32(hi, 2));
      }
    }
  }
}
#endif

}  // namespace pyquant
