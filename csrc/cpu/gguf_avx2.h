// AVX2 helpers shared by the GGUF dequantize and matmul kernels. Included
// only on x86; every function is compiled for AVX2+FMA+F16C and called only
// when simd_level() says the CPU has them.
#pragma once
#include "simd.h"
#include "pyquant/gguf_blocks.h"

#if PQ_X86
#include <immintrin.h>

namespace pyquant {
namespace gguf {
namespace avx2 {

PQ_TARGET_AVX2 inline float f16_at(const uint8_t* p) {
  // F16C's conversion is exact (every fp16 is representable in fp32).
  return _cvtsh_ss(static_cast<unsigned short>(load_u16le(p)));
}

PQ_TARGET_AVX2 inline __m256i load256(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// 8 bytes packed in a 64-bit word -> 8 floats.
PQ_TARGET_AVX2 inline __m256 u8x8_to_ps(uint64_t v) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(v))));
}

// Q4_K / Q5_K: dl[j] = d * scale_j and ml[j] = dmin * min_j for the 8
// sub-blocks (exact products, as in gguf-py).
PQ_TARGET_AVX2 inline void k_scales(const uint8_t* blk, __m256& dl, __m256& ml) {
  uint32_t sc[2], m[2];
  k_scales_mins(blk + LayoutQ4_K::kScales, sc, m);
  dl = _mm256_mul_ps(_mm256_set1_ps(f16_at(blk + LayoutQ4_K::kD)), u8x8_to_ps(sc[0] | (uint64_t(sc[1]) << 32)));
  ml = _mm256_mul_ps(_mm256_set1_ps(f16_at(blk + LayoutQ4_K::kDmin)), u8x8_to_ps(m[0] | (uint64_t(m[1]) << 32)));
}

// Q6_K: dl[0..16) = d * int8 scale.
PQ_TARGET_AVX2 inline void q6k_scales(const uint8_t* blk, float* dl) {
  const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + LayoutQ6_K::kScales));
  const __m256 d = _mm256_set1_ps(f16_at(blk + LayoutQ6_K::kD));
  _mm256_storeu_ps(dl, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s))));
  _mm256_storeu_ps(dl + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s, 8)))));
}

// The 4 x 32 signed codes of half h of a Q6_K block (elements 128h + 32s + l):
// nibbles from ql[64h + 32(s&1) + l] (high nibble for s >= 2) and 2-bit
// high parts from qh[32h + l] >> 2s.
PQ_TARGET_AVX2 inline void q6k_half(const uint8_t* b, int h, __m256i q[4]) {
  const __m256i a = load256(b + LayoutQ6_K::kQl + 64 * h), c = load256(b + LayoutQ6_K::kQl + 64 * h + 32);
  const __m256i hb = load256(b + LayoutQ6_K::kQh + 32 * h);
  const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
  const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4);
  const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m3), 4);
  const __m256i h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m3), 4);
  const __m256i h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m3), 4);
  q[0] = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(a, m4), h0), off);
  q[1] = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(c, m4), h1), off);
  q[2] = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), h2), off);
  q[3] = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), m4), h3), off);
}

}  // namespace avx2
}  // namespace gguf
}  // namespace pyquant
#endif  // PQ_X86
