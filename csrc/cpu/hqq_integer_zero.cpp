// HQQ around an integer zero point on the CPU.
//
// The spec (and the reason this is pyquant's default HQQ) is
// pyquant/algorithms/hqq_integer_zero.py. Per group: RTN's scale and integer
// zero, then steps of  s = <q - z, W - shrink(W - W_hat)> / <q - z, q - z>,
// never below the scale that would clip the group's min or max; then HQQ's
// zero step at that scale, the zero kept within zero_slack of the integer
// (zero_slack 0: the zero stays an integer). Same fp32
// expressions as the spec; sums run in another order than torch's, so a
// group's scale can differ in the last bit and, rarely, choose another
// iterate (tests compare with a tolerance).
//
// Groups are independent and small (32..256 floats): each stays in L1 for
// all its steps, OpenMP hands groups to threads. Plain loops: the step is a
// handful of flops per weight and the shrinkage pow() only runs where
// |W - W_hat| exceeds beta^(-1/(2-p)), which LLM-scale weights never do.
#include "fp_contract_off.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "hqq_kernels.h"

namespace pyquant {
namespace {

inline float code(float w, float sinv, float z, float maxq) {
  return std::min(std::max(std::nearbyint(w * sinv + z), 0.0f), maxq);
}

float sq_err(const float* w, int64_t L, float s, float z, float maxq) {  // z: any (stored) zero point
  const float sinv = 1.0f / s;
  float e = 0.0f;
  for (int64_t i = 0; i < L; ++i) {
    const float d = w[i] - (code(w[i], sinv, z, maxq) - z) * s;
    e += d * d;
  }
  return e;
}

// The stored scale: rounded to the format's dtype, one ulp up where rounding
// fell below the no-clip floor.
float store(float s, float floor, int dtype) {
  const float st = round_to_dtype(s, dtype);
  return st < floor ? next_up_in_dtype(st, dtype) : st;
}

void solve_group(const float* w, int64_t L, uint8_t* codes, float* s_out, float* z_out, float* e_out,
                 int32_t* steps_out, const HqqParams& P, float zero_slack) {
  const float maxq = P.maxq;
  const float p1 = P.lp_norm - 1.0f;
  float lo = w[0], hi = w[0];
  for (int64_t i = 1; i < L; ++i) {
    lo = std::min(lo, w[i]);
    hi = std::max(hi, w[i]);
  }
  // RTN: range widened to include 0, integer zero (pyquant/algorithms/hqq_reference.py:rtn_scale_zero).
  const float lo_r = std::min(lo, 0.0f), hi_r = std::max(hi, 0.0f);
  float s_r = round_to_dtype((hi_r - lo_r) / maxq, P.dtype);
  if (!(s_r > 0.0f)) s_r = P.tiny;
  const float z = std::min(std::max(std::nearbyint(-lo_r / s_r), 0.0f), maxq);
  const float floor = std::max(std::max(hi, 0.0f) / (maxq + 0.5f - z), std::max(-lo, 0.0f) / (z + 0.5f));

  float best_s = s_r, best = sq_err(w, L, s_r, z, maxq);
  float s = s_r;
  int32_t steps = 0;
  if (hi > lo) {
    for (int it = 0; it < P.iters; ++it) {
      const float sinv = 1.0f / s;
      const float inv_beta = P.inv_beta[it], thr = P.thr[it];
      float num = 0.0f, den = 0.0f, maxd = 0.0f;
      for (int64_t i = 0; i < L; ++i) {
        const float qz = code(w[i], sinv, z, maxq) - z;
        const float d = w[i] - qz * s;
        const float a = std::fabs(d);
        const float we = shrink_lp(d, thr, p1, inv_beta);
        num += qz * (w[i] - we);
        den += qz * qz;
        maxd = std::max(maxd, a);
      }
      float s_new = den > 0.0f ? num / den : s;
      s_new = std::max(s_new, floor);
      ++steps;
      const float s_st = store(s_new, floor, P.dtype);
      const float e = sq_err(w, L, s_st, z, maxq);
      if (e < best) {
        best = e;
        best_s = s_st;
      }
      // A fixed point: the scale reproduces itself and no shrinkage can switch
      // on at a later (larger) beta, so every further iterate equals this one.
      if (P.early_stop && s_new == s && (P.kappa_one || maxd <= P.thr_last)) break;
      s = s_new;
    }
  }
  // Phase 2: HQQ's zero step at that stored scale, the zero kept within
  // zero_slack of the integer (so a weight of 0 stays within that many steps).
  float best_z = z;
  if (hi > lo && zero_slack > 0.0f) {
    const float s_fix = best_s, sinv = 1.0f / s_fix;
    const float z_lo = z - zero_slack, z_hi = z + zero_slack;
    float zd = z;
    for (int it = 0; it < P.iters; ++it) {
      const float inv_beta = P.inv_beta[it], thr = P.thr[it];
      float tsum = 0.0f, maxd = 0.0f;
      for (int64_t i = 0; i < L; ++i) {
        const float q = code(w[i], sinv, zd, maxq);
        const float d = w[i] - (q - zd) * s_fix;
        const float a = std::fabs(d);
        const float we = shrink_lp(d, thr, p1, inv_beta);
        tsum += q - (w[i] - we) * sinv;
        maxd = std::max(maxd, a);
      }
      const float z_new = std::min(std::max(tsum / static_cast<float>(L), z_lo), z_hi);
      ++steps;
      const float zs = round_to_dtype(z_new, P.dtype);
      const float e = sq_err(w, L, s_fix, zs, maxq);
      if (e < best) {
        best = e;
        best_z = zs;
      }
      if (P.early_stop && z_new == zd && (P.kappa_one || maxd <= P.thr_last)) break;
      zd = z_new;
    }
  }
  const float sinv = 1.0f / best_s;
  for (int64_t i = 0; i < L; ++i) codes[i] = static_cast<uint8_t>(code(w[i], sinv, best_z, maxq));
  *s_out = best_s;
  *z_out = best_z;
  *e_out = best;
  *steps_out = steps;
}

}  // namespace

void hqq_solve_integer_zero(const float* w, const HqqOutputs& out, int64_t n, int64_t k, int64_t group,
                            const HqqParams& P, float zero_slack, int nthreads) {
  for_each_group(w, out, n, k, group, nthreads, [&P, zero_slack](auto... a) { solve_group(a..., P, zero_slack); });
}

}  // namespace pyquant
