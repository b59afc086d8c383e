// Horizontal reductions of one AVX2 register to a float (and the lane mask of
// a ragged end), shared by every CPU kernel family. Compiled for AVX2 (PQ_TARGET_AVX2): call them only where
// simd_level() says AVX2. One definition keeps the summation order (upper
// half onto lower, then pairs) the same in every kernel.
#pragma once
#include "simd.h"

#if PQ_X86
#include <immintrin.h>

namespace pyquant {

// Lanes [0, n) of 8 set, the rest clear (n <= 8): the ragged end of a row,
// group or rank. Not a reduction, but every family needs it beside them.
PQ_TARGET_AVX2 inline __m256i lanes_below_avx2(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

PQ_TARGET_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

PQ_TARGET_AVX2 inline float hmax_avx2(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

PQ_TARGET_AVX2 inline float hmin_avx2(__m256 v) {
  __m128 s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_min_ps(s, _mm_movehl_ps(s, s));
  s = _mm_min_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace pyquant
#endif  // PQ_X86
