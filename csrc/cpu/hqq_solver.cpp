// HQQ solver on the CPU: one fused pass per proximal step, OpenMP over groups.
//
// The spec is pyquant/algorithms/hqq_reference.py; this file follows its fp32
// arithmetic step by step (same operation order, round half to even, no fused
// multiply-add), so codes agree with it except where the order of a sum
// changes the last bit of a zero point. Each group is independent and small
// (32..256 floats, or one row per channel), so it stays in L1 while all its
// iterations run: the solver is compute-bound, and the work per element and
// step is a handful of vector ops plus, only where shrinkage is active, a
// pow() done with a vectorised log2/exp2.
//
// Contraction of a*b+c into an FMA would change rounding against the spec,
// hence fp_contract_off.h first.
#include "fp_contract_off.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "avx2_reduce.h"
#include "hqq_kernels.h"
#include "simd.h"

#if PQ_X86
#include <immintrin.h>
#endif

namespace pyquant {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct StepOut {
  float zsum;    // sum of q - (w - w_e) / s over the group
  float maxd;    // max |w - w_hat| of the iterate
  float err;     // squared error of the scored iterate
};

// ---------------------------------------------------------------- scalar ---
struct Scalar {
  static float qz(float w, float sinv, float z, float maxq) {
    float q = std::nearbyint(w * sinv + z);
    return std::min(std::max(q, 0.0f), maxq);
  }

  static void minmax(const float* w, int64_t L, float& lo, float& hi) {
    lo = kInf;
    hi = -kInf;
    for (int64_t i = 0; i < L; ++i) {
      lo = std::min(lo, w[i]);
      hi = std::max(hi, w[i]);
    }
  }

  static float eval(const float* w, int64_t L, float s, float z, float sinv, float maxq) {
    float e = 0.0f;
    for (int64_t i = 0; i < L; ++i) {
      const float d = w[i] - (qz(w[i], sinv, z, maxq) - z) * s;
      e += d * d;
    }
    return e;
  }

  static StepOut step(const float* w, int64_t L, float maxq, float s32, float sinv_d, float zd, float inv_beta,
                      float thr, float p1, bool score, float s_st, float sinv_e, float zs) {
    StepOut o{0.0f, 0.0f, 0.0f};
    for (int64_t i = 0; i < L; ++i) {
      const float q = qz(w[i], sinv_d, zd, maxq);
      const float d = w[i] - (q - zd) * s32;
      const float a = std::fabs(d);
      const float we = shrink_lp(d, thr, p1, inv_beta);
      o.zsum += q - (w[i] - we) * sinv_d;
      o.maxd = std::max(o.maxd, a);
      if (score) {
        const float de = w[i] - (qz(w[i], sinv_e, zs, maxq) - zs) * s_st;
        o.err += de * de;
      } else {
        o.err += d * d;
      }
    }
    return o;
  }

  static void codes(const float* w, int64_t L, float sinv, float z, float maxq, uint8_t* out) {
    for (int64_t i = 0; i < L; ++i) out[i] = static_cast<uint8_t>(qz(w[i], sinv, z, maxq));
  }
};

#if PQ_X86
// ------------------------------------------------------------- AVX2+FMA ---
struct Avx2 {
  PQ_TARGET_AVX2 static inline __m256 qz(__m256 w, __m256 sinv, __m256 z, __m256 maxq) {
    __m256 q = _mm256_round_ps(_mm256_add_ps(_mm256_mul_ps(w, sinv), z), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_min_ps(_mm256_max_ps(q, _mm256_setzero_ps()), maxq);
  }

  // x**p for x > 0 as exp2(p * log2(x)); relative error ~1e-7, ample for a
  // shrinkage term that only moves a mean.
  PQ_TARGET_AVX2 static inline __m256 pow_pos(__m256 x, __m256 p) {
    const __m256i bits = _mm256_castps_si256(x);
    __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127)));
    __m256 m = _mm256_castsi256_ps(
        _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffff)), _mm256_set1_epi32(0x3f800000)));
    // m in [1, 2): fold to [sqrt(1/2), sqrt(2)) so the series argument stays small.
    const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
    m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
    e = _mm256_add_ps(e, _mm256_and_ps(big, _mm256_set1_ps(1.0f)));
    // ln(m) = 2 atanh(t), t = (m-1)/(m+1), |t| < 0.172: odd series to t^11.
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 t = _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one));
    const __m256 t2 = _mm256_mul_ps(t, t);
    __m256 poly = _mm256_set1_ps(1.0f / 11.0f);
    poly = _mm256_fmadd_ps(poly, t2, _mm256_set1_ps(1.0f / 9.0f));
    poly = _mm256_fmadd_ps(poly, t2, _mm256_set1_ps(1.0f / 7.0f));
    poly = _mm256_fmadd_ps(poly, t2, _mm256_set1_ps(1.0f / 5.0f));
    poly = _mm256_fmadd_ps(poly, t2, _mm256_set1_ps(1.0f / 3.0f));
    poly = _mm256_fmadd_ps(poly, t2, one);
    const __m256 ln_m = _mm256_mul_ps(_mm256_add_ps(t, t), poly);
    const __m256 log2x = _mm256_fmadd_ps(ln_m, _mm256_set1_ps(1.44269504f), e);
    // exp2(y) = 2^n * e^(r ln2), n = round(y), |r| <= 1/2: Taylor to degree 7.
    __m256 y = _mm256_mul_ps(p, log2x);
    y = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-126.0f)), _mm256_set1_ps(126.0f));
    const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_mul_ps(_mm256_sub_ps(y, n), _mm256_set1_ps(0.69314718f));
    __m256 ex = _mm256_set1_ps(1.0f / 5040.0f);
    ex = _mm256_fmadd_ps(ex, r, _mm256_set1_ps(1.0f / 720.0f));
    ex = _mm256_fmadd_ps(ex, r, _mm256_set1_ps(1.0f / 120.0f));
    ex = _mm256_fmadd_ps(ex, r, _mm256_set1_ps(1.0f / 24.0f));
    ex = _mm256_fmadd_ps(ex, r, _mm256_set1_ps(1.0f / 6.0f));
    ex = _mm256_fmadd_ps(ex, r, _mm256_set1_ps(0.5f));
    ex = _mm256_fmadd_ps(ex, r, one);
    ex = _mm256_fmadd_ps(ex, r, one);
    const __m256i sh = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(ex), sh));
  }

  PQ_TARGET_AVX2 static void minmax(const float* w, int64_t L, float& lo, float& hi) {
    __m256 vlo = _mm256_set1_ps(kInf), vhi = _mm256_set1_ps(-kInf);
    int64_t i = 0;
    for (; i + 8 <= L; i += 8) {
      const __m256 x = _mm256_loadu_ps(w + i);
      vlo = _mm256_min_ps(vlo, x);
      vhi = _mm256_max_ps(vhi, x);
    }
    lo = hmin_avx2(vlo);
    hi = hmax_avx2(vhi);
    for (; i < L; ++i) {
      lo = std::min(lo, w[i]);
      hi = std::max(hi, w[i]);
    }
  }

  PQ_TARGET_AVX2 static float eval(const float* w, int64_t L, float s, float z, float sinv, float maxq_) {
    const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), vsinv = _mm256_set1_ps(sinv);
    const __m256 maxq = _mm256_set1_ps(maxq_);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= L; i += 8) {
      const __m256 x = _mm256_loadu_ps(w + i);
      const __m256 d = _mm256_sub_ps(x, _mm256_mul_ps(_mm256_sub_ps(qz(x, vsinv, vz, maxq), vz), vs));
      acc = _mm256_add_ps(acc, _mm256_mul_ps(d, d));
    }
    if (i < L) {
      const __m256i m = lanes_below_avx2(L - i);
      const __m256 x = _mm256_maskload_ps(w + i, m);
      __m256 d = _mm256_sub_ps(x, _mm256_mul_ps(_mm256_sub_ps(qz(x, vsinv, vz, maxq), vz), vs));
      d = _mm256_and_ps(d, _mm256_castsi256_ps(m));
      acc = _mm256_add_ps(acc, _mm256_mul_ps(d, d));
    }
    return hsum_avx2(acc);
  }

  // One proximal step on the unrounded zero zd, fused with scoring the
  // stored-precision iterate (zs, s_st) when it differs from (zd, s32).
  template <bool kScore, bool kTail>
  PQ_TARGET_AVX2 static inline void step_lanes(__m256 x, __m256 lanes, __m256 maxq, __m256 s32, __m256 sinv_d,
                                               __m256 zd, __m256 inv_beta, __m256 thr, __m256 p1, __m256 s_st,
                                               __m256 sinv_e, __m256 zs, __m256& zacc, __m256& dmax,
                                               __m256& eacc) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 q = qz(x, sinv_d, zd, maxq);
    __m256 d = _mm256_sub_ps(x, _mm256_mul_ps(_mm256_sub_ps(q, zd), s32));
    if (kTail) d = _mm256_and_ps(d, lanes);
    const __m256 a = _mm256_andnot_ps(sign, d);
    const __m256 on = _mm256_cmp_ps(a, thr, _CMP_GT_OQ);
    __m256 we = _mm256_setzero_ps();
    if (_mm256_movemask_ps(on)) {  // rare for LLM-scale weights: |d| << threshold
      const __m256 pw = pow_pos(_mm256_max_ps(a, _mm256_set1_ps(1e-30f)), p1);
      __m256 v = _mm256_max_ps(_mm256_sub_ps(a, _mm256_mul_ps(pw, inv_beta)), _mm256_setzero_ps());
      v = _mm256_and_ps(v, on);
      we = _mm256_or_ps(v, _mm256_and_ps(d, sign));
    }
    __m256 t = _mm256_sub_ps(q, _mm256_mul_ps(_mm256_sub_ps(x, we), sinv_d));
    if (kTail) t = _mm256_and_ps(t, lanes);
    zacc = _mm256_add_ps(zacc, t);
    dmax = _mm256_max_ps(dmax, a);
    if (kScore) {
      __m256 de = _mm256_sub_ps(x, _mm256_mul_ps(_mm256_sub_ps(qz(x, sinv_e, zs, maxq), zs), s_st));
      if (kTail) de = _mm256_and_ps(de, lanes);
      eacc = _mm256_add_ps(eacc, _mm256_mul_ps(de, de));
    } else {
      eacc = _mm256_add_ps(eacc, _mm256_mul_ps(d, d));
    }
  }

  template <bool kScore>
  PQ_TARGET_AVX2 static StepOut step_impl(const float* w, int64_t L, float maxq_, float s32_, float sinv_d_,
                                          float zd_, float inv_beta_, float thr_, float p1_, float s_st_,
                                          float sinv_e_, float zs_) {
    const __m256 maxq = _mm256_set1_ps(maxq_), s32 = _mm256_set1_ps(s32_), sinv_d = _mm256_set1_ps(sinv_d_);
    const __m256 zd = _mm256_set1_ps(zd_), inv_beta = _mm256_set1_ps(inv_beta_), thr = _mm256_set1_ps(thr_);
    const __m256 p1 = _mm256_set1_ps(p1_), s_st = _mm256_set1_ps(s_st_), sinv_e = _mm256_set1_ps(sinv_e_);
    const __m256 zs = _mm256_set1_ps(zs_);
    __m256 zacc = _mm256_setzero_ps(), dmax = _mm256_setzero_ps(), eacc = _mm256_setzero_ps();
    const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    int64_t i = 0;
    for (; i + 8 <= L; i += 8)
      step_lanes<kScore, false>(_mm256_loadu_ps(w + i), all, maxq, s32, sinv_d, zd, inv_beta, thr, p1, s_st, sinv_e,
                                zs, zacc, dmax, eacc);
    if (i < L) {
      const __m256i m = lanes_below_avx2(L - i);
      step_lanes<kScore, true>(_mm256_maskload_ps(w + i, m), _mm256_castsi256_ps(m), maxq, s32, sinv_d, zd, inv_beta,
                               thr, p1, s_st, sinv_e, zs, zacc, dmax, eacc);
    }
    return StepOut{hsum_avx2(zacc), hmax_avx2(dmax), hsum_avx2(eacc)};
  }

  static StepOut step(const float* w, int64_t L, float maxq, float s32, float sinv_d, float zd, float inv_beta,
                      float thr, float p1, bool score, float s_st, float sinv_e, float zs) {
    return score ? step_impl<true>(w, L, maxq, s32, sinv_d, zd, inv_beta, thr, p1, s_st, sinv_e, zs)
                 : step_impl<false>(w, L, maxq, s32, sinv_d, zd, inv_beta, thr, p1, s_st, sinv_e, zs);
  }

  PQ_TARGET_AVX2 static void codes(const float* w, int64_t L, float sinv_, float z_, float maxq_, uint8_t* out) {
    const __m256 sinv = _mm256_set1_ps(sinv_), z = _mm256_set1_ps(z_), maxq = _mm256_set1_ps(maxq_);
    int64_t i = 0;
    for (; i + 8 <= L; i += 8) {
      const __m256i v = _mm256_cvtps_epi32(qz(_mm256_loadu_ps(w + i), sinv, z, maxq));
      const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(h, h));
    }
    for (; i < L; ++i) out[i] = static_cast<uint8_t>(Scalar::qz(w[i], sinv_, z_, maxq_));
  }
};
#endif

template <class I>
void solve_group(const float* w, int64_t L, uint8_t* codes, float* s_out, float* z_out, float* e_out,
                 int32_t* steps_out, const HqqParams& P) {
  const float maxq = P.maxq;
  float lo, hi;
  I::minmax(w, L, lo, hi);

  // Candidate 1: pyquant's RTN (its range includes 0; integral zero point).
  const float lo_r = std::min(lo, 0.0f), hi_r = std::max(hi, 0.0f);
  float s_r = round_to_dtype((hi_r - lo_r) / maxq, P.dtype);
  if (!(s_r > 0.0f)) s_r = P.tiny;
  const float z_r = std::min(std::max(std::nearbyint(-lo_r / s_r), 0.0f), maxq);
  const float sinv_r = 1.0f / s_r;
  const float e_r = I::eval(w, L, s_r, z_r, sinv_r, maxq);

  // Candidate 2: HQQ from hqq's min/max init.
  const float sinv_h = maxq / (hi - lo);
  const float s32 = 1.0f / sinv_h;
  const float s_st = round_to_dtype(s32, P.dtype);
  const float sinv_d = 1.0f / s32, sinv_e = 1.0f / s_st;
  float zd = -lo * sinv_d;
  const bool ok = hi > lo && std::isfinite(s32) && s_st > 0.0f && std::isfinite(s_st) && std::isfinite(sinv_e) &&
                  std::isfinite(sinv_d) && std::isfinite(round_to_dtype(zd, P.dtype));
  float best = kInf, best_z = 0.0f;
  int32_t steps = 0;
  if (ok) {
    const float p1 = P.lp_norm - 1.0f;
    for (int it = 0;; ++it) {
      const float zs = round_to_dtype(zd, P.dtype);
      if (it == P.iters) {
        const float e = I::eval(w, L, s_st, zs, sinv_e, maxq);
        if (e < best) {
          best = e;
          best_z = zs;
        }
        break;
      }
      // With fp32 storage the scored iterate is the iterated one: one pass.
      const bool score = !(s_st == s32 && zs == zd);
      const StepOut o = I::step(w, L, maxq, s32, sinv_d, zd, P.inv_beta[it], P.thr[it], p1, score, s_st, sinv_e, zs);
      if (o.err < best) {
        best = o.err;
        best_z = zs;
      }
      ++steps;
      const float znew = o.zsum / static_cast<float>(L);
      // A fixed point: z reproduces itself and no shrinkage can switch on at a
      // later (larger) beta, so every further iterate equals this one.
      const bool fixed = P.early_stop && znew == zd && (P.kappa_one || o.maxd <= P.thr_last);
      zd = znew;
      if (fixed) break;
    }
  }

  const bool use_h = best <= e_r;
  const float s = use_h ? s_st : s_r, z = use_h ? best_z : z_r;
  I::codes(w, L, use_h ? sinv_e : sinv_r, z, maxq, codes);
  *s_out = s;
  *z_out = z;
  *e_out = use_h ? best : e_r;
  *steps_out = steps;
}

}  // namespace

void hqq_solve(const float* w, const HqqOutputs& out, int64_t n, int64_t k, int64_t group, const HqqParams& P,
               int nthreads) {
#if PQ_X86
  if (simd_has_avx2()) {
    for_each_group(w, out, n, k, group, nthreads, [&P](auto... a) { solve_group<Avx2>(a..., P); });
    return;
  }
#endif
  for_each_group(w, out, n, k, group, nthreads, [&P](auto... a) { solve_group<Scalar>(a..., P); });
}

}  // namespace pyquant
