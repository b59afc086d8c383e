// Internal interface of the NF4 CPU kernels (nf4_dequant.cpp, nf4_matmul.cpp).
#pragma once
#include <cstdint>
#include <cstring>

#include "lora_epilogue.h"
#include "pyquant/nf4_decode.h"
#include "simd.h"

#if PQ_X86
#include <immintrin.h>
#endif

namespace pyquant {
namespace nf4cpu {

// One packed NF4 weight (N, K): flat row-major blocks of block_size that may
// span rows (pyquant/formats/nf4.py).
struct Weight {
  const uint8_t* qweight;
  int64_t n, k, block_size;
  Nf4Scales scales;
};

// out[j] = W_flat[begin + j] for j < end - begin: exactly the reference's
// fp32 values (codebook * absmax, one multiply). Any begin/end, odd included.
// The AVX2 version must only run where simd_level() says AVX2.
void decode_range_scalar(const Weight& w, int64_t begin, int64_t end, float* out);
void decode_range_avx2(const Weight& w, int64_t begin, int64_t end, float* out);

// out ((row_end - row_begin) * K fp32) = rows [row_begin, row_end) of the
// dequantized weight.
void dequantize(const Weight& w, float* out, int nthreads, int64_t row_begin, int64_t row_end);

// y (M, N) fp32 = x (M, K) fp32 @ W^T (+ bias fp32 (N,) if not null) (+ the
// low-rank epilogue). path: -1 chooses by M; 0 forces the fused (GEMV-style)
// kernel, 1 the tiled one (tests run both on every shape).
void qmatmul(const Weight& w, const float* x, int64_t m, const float* bias, const LoraEpilogue& lora, float* y,
             int nthreads, int path = -1);

// The codebook in two int8 planes for the integer-dot kernels (q8_kernels.h):
// 127 c ~ c8 + r8 / 256, c8 = round(127 c), r8 = round(256 (127 c - c8)).
// c8 alone is off by up to 0.5 / 127 of the block's absmax, which measured up
// to 1.1% on SmolLM2's outputs; with r8, 1.4e-5 of it.
constexpr int8_t kNf4CodebookI8[16] = {-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127};
constexpr int8_t kNf4CodebookR8[16] = {0, -107, 81, -40, -32, -119, 112, 0, 27, 112, 66, -22, -8, 116, -47, 0};
constexpr float kNf4I8Inv = 1.0f / 127.0f;

// The backward's transposed product (nf4_transposed.cpp): out (M, K) fp32 =
// g (M, N) fp32 @ W, without materialising W.
void qmatmul_t(const Weight& w, const float* g, int64_t m, float* out, int nthreads);
// out (N, k1 - k0) fp32 = columns [k0, k1) of every row of W (any k0 < k1 <= K).
void decode_panel(const Weight& w, int64_t k0, int64_t k1, float* out, int nthreads);

// block_size is a power of two (the format enforces it): block index = i >> log2.
inline int nf4_log2(int64_t v) { return __builtin_ctzll(static_cast<unsigned long long>(v)); }

#if PQ_X86
// The codebook as two 8-lane tables: vpermps indexes 8 lanes with the low 3
// bits of each index, bit 3 picks the table.
struct Nf4Lut {
  __m256 lo, hi;
};

PQ_TARGET_AVX2 inline Nf4Lut nf4_lut() {
  return {_mm256_loadu_ps(kNf4Codebook), _mm256_loadu_ps(kNf4Codebook + 8)};
}

// Codebook values of the 8 codes in the 4 bytes at p (flat index even), in
// element order. The bytes are broadcast (a plain load on the load ports) and
// each lane shifts its own nibble down with vpsrlvd: the only shuffles are
// the two vpermps, which matter because shuffles have the fewest ports. No
// mask is needed: vpermps reads bits 0-2 and blendv bit 31 (= code bit 3
// after << 28); higher garbage bits are ignored by both.
PQ_TARGET_AVX2 inline __m256 nf4_decode8(const Nf4Lut& t, const uint8_t* p) {
  int32_t word;
  memcpy(&word, p, 4);
  // Element 2j is the high nibble of byte j, element 2j+1 the low nibble.
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  const __m256i codes = _mm256_srlv_epi32(_mm256_set1_epi32(word), shifts);
  const __m256 a = _mm256_permutevar8x32_ps(t.lo, codes);
  const __m256 b = _mm256_permutevar8x32_ps(t.hi, codes);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
}

// The codebook's fp32 values as four byte planes, each in both 128-bit lanes
// (vpshufb tables): plane j holds byte j of every value.
struct Nf4ByteLut {
  __m256i plane[4];
};

PQ_TARGET_AVX2 inline Nf4ByteLut nf4_byte_lut() {
  Nf4ByteLut t;
  for (int j = 0; j < 4; ++j) {
    alignas(16) uint8_t bytes[16];
    for (int v = 0; v < 16; ++v) {
      uint32_t u;
      memcpy(&u, &kNf4Codebook[v], 4);
      bytes[v] = uint8_t(u >> (8 * j));
    }
    t.plane[j] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes)));
  }
  return t;
}

// The order nf4_decode32 leaves values in: vector j holds elements
// 8j + kNf4Decode32Order[0..7] (even elements in the low 128-bit lane, odd in
// the high one). x is put in this order once per call instead.
constexpr int kNf4Decode32Order[8] = {0, 2, 4, 6, 1, 3, 5, 7};

// Codebook values of the 32 codes in the 16 bytes at p (flat index even),
// exact, in kNf4Decode32Order. The high nibbles (even elements) go to the
// low lane and the low nibbles to the high one; four vpshufb look up the four
// bytes of each value and two rounds of unpacks assemble them into floats:
// 12 shuffles per 32 values where nf4_decode8 takes 8 vpermps, 4 blends and
// 4 variable shifts. On Zen 3, in a loop of FMAs from L1, 0.88 ns per 8
// values against nf4_decode8's 1.43.
PQ_TARGET_AVX2 inline void nf4_decode32(const Nf4ByteLut& t, const uint8_t* p, __m256 (&out)[4]) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i codes = _mm256_and_si256(_mm256_set_m128i(b, _mm_srli_epi16(b, 4)), _mm256_set1_epi8(0x0F));
  const __m256i b0 = _mm256_shuffle_epi8(t.plane[0], codes), b1 = _mm256_shuffle_epi8(t.plane[1], codes);
  const __m256i b2 = _mm256_shuffle_epi8(t.plane[2], codes), b3 = _mm256_shuffle_epi8(t.plane[3], codes);
  const __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
  out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
  out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
  out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
  out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
}
#endif

}  // namespace nf4cpu
}  // namespace pyquant
