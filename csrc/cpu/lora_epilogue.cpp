// LoraEpilogue::apply with AVX2: eight outputs of a row of y at a time. Each
// output is an r-long dot product of the row's xa with one row of B, summed
// in 8-lane partials along r; the eight partial vectors are then reduced
// together by one transpose-and-add tree (6 shuffles for 8 sums instead of
// 8 separate horizontal sums), and the eight sums land in y with one FMA.
#include "lora_epilogue.h"

#include "avx2_reduce.h"

#if PQ_X86
#include <immintrin.h>

namespace pyquant {
namespace {

// [sum v[0], ..., sum v[7]].
PQ_TARGET_AVX2 inline __m256 sum8(const __m256 v[8]) {
  // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | the same for lanes 4..7].
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // Low 128-bit halves hold the sums over lanes 0..3, high halves over 4..7.
  const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}

PQ_TARGET_AVX2 inline float dot_avx2(const float* a, const float* b, int64_t r, int64_t full, __m256i mask) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j < full; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
  if (j < r) acc = _mm256_fmadd_ps(_mm256_maskload_ps(a + j, mask), _mm256_maskload_ps(b + j, mask), acc);
  return hsum_avx2(acc);
}

}  // namespace

PQ_TARGET_AVX2 void lora_epilogue_avx2(const LoraEpilogue& e, float* y, int64_t ldy, int64_t m0, int64_t m1,
                                       int64_t n0, int64_t n1) {
  const int64_t r = e.rank, full = r & ~int64_t(7);
  const __m256i mask = lanes_below_avx2(r - full);  // the rank's ragged last 8
  const __m256 scale = _mm256_set1_ps(e.scale);
  for (int64_t m = m0; m < m1; ++m) {
    const float* a = e.xa + m * r;
    float* yr = y + m * ldy;
    int64_t n = n0;
    for (; n + 8 <= n1; n += 8) {
      __m256 acc[8];
      for (int t = 0; t < 8; ++t) acc[t] = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j < full; j += 8) {
        const __m256 av = _mm256_loadu_ps(a + j);
        for (int t = 0; t < 8; ++t) acc[t] = _mm256_fmadd_ps(av, _mm256_loadu_ps(e.b + (n + t) * r + j), acc[t]);
      }
      if (j < r) {
        const __m256 av = _mm256_maskload_ps(a + j, mask);
        for (int t = 0; t < 8; ++t)
          acc[t] = _mm256_fmadd_ps(av, _mm256_maskload_ps(e.b + (n + t) * r + j, mask), acc[t]);
      }
      _mm256_storeu_ps(yr + n, _mm256_fmadd_ps(scale, sum8(acc), _mm256_loadu_ps(yr + n)));
    }
    for (; n < n1; ++n) yr[n] += e.scale * dot_avx2(a, e.b + n * r, r, full, mask);
  }
}

}  // namespace pyquant
#endif  // PQ_X86
