// Internal interface of the two HQQ CPU solvers (hqq_solver.cpp: float zero
// points, hqq_integer_zero.cpp: zero points anchored at integers; bound in
// hqq_bindings.cpp) and what they share: rounding of per-group scalars to the
// stored dtype, the solver parameters, the output pointers and the parallel
// loop over groups.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "pyquant/common.h"

namespace pyquant {

// fp32 -> the scale dtype (a DType) -> fp32, round to nearest even, overflow
// to inf.
inline float round_to_dtype(float x, int dtype) {
  if (dtype == kF32 || !std::isfinite(x)) return x;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (dtype == kBF16) {  // keep the top 16 bits, ties to even
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    float r;
    std::memcpy(&r, &u, 4);
    return r;
  }
  const float a = std::fabs(x);
  if (a >= 65520.0f) return std::copysign(std::numeric_limits<float>::infinity(), x);  // past fp16's max 65504
  if (a < 6.103515625e-05f) {  // fp16 subnormal: multiples of 2^-24 (the scaling is exact)
    return std::nearbyint(x * 16777216.0f) * 5.9604644775390625e-08f;
  }
  u += 0xfffu + ((u >> 13) & 1u);  // 10 mantissa bits, ties to even; a carry moves the exponent
  u &= 0xffffe000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// The next value above x (finite, >= 0, already representable) in that dtype.
inline float next_up_in_dtype(float x, int dtype) {
  if (dtype == kF32) return std::nextafter(x, std::numeric_limits<float>::infinity());
  if (dtype == kF16 && x < 6.103515625e-05f) return x + 5.9604644775390625e-08f;  // fp16 subnormal step 2^-24
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += dtype == kBF16 ? 0x10000u : 0x2000u;  // one ulp of the 7 / 10 kept mantissa bits
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// hqq's generalised soft threshold (shrink_lp_op) of an error d:
// sign(d) * max(|d| - |d|^(p-1) / beta, 0), and 0 at or below the threshold
// (where it is 0 mathematically; the spec's THRESHOLD_MARGIN explains thr).
inline float shrink_lp(float d, float thr, float p1, float inv_beta) {
  const float a = std::fabs(d);
  if (!(a > thr)) return 0.0f;
  const float v = std::max(a - std::pow(std::max(a, 1e-30f), p1) * inv_beta, 0.0f);
  return d < 0.0f ? -v : v;
}

struct HqqParams {
  float maxq;
  int dtype;
  int iters;
  const float* inv_beta;  // 1/beta per step (solver_schedule row 0)
  const float* thr;       // shrink threshold per step (row 1)
  float thr_last;
  float lp_norm;
  bool kappa_one;
  bool early_stop;
  float tiny;  // RTN's scale for an all-zero group

  // schedule: fp32 (2, iters), solver_schedule's rows.
  HqqParams(int bits, int scale_dtype, int iters_, const float* schedule, double lp, bool kappa_is_one, bool stop)
      : maxq(static_cast<float>((1 << bits) - 1)), dtype(scale_dtype), iters(iters_), inv_beta(schedule),
        thr(inv_beta + iters_),
        thr_last(iters_ > 0 ? thr[iters_ - 1] : 0.0f), lp_norm(static_cast<float>(lp)), kappa_one(kappa_is_one),
        early_stop(stop), tiny(scale_dtype == kF32 ? std::numeric_limits<float>::min() : 6.103515625e-05f) {}
};

// The solvers' outputs: codes (n, k) uint8; scales, zeros, err (n, G) fp32;
// steps (n, G) int32.
struct HqqOutputs {
  uint8_t* codes;
  float* scales;
  float* zeros;
  float* err;
  int32_t* steps;
};

// fn(w, L, codes, scale, zero, err, steps) for every group of w (n, k) cut
// along k into groups of `group` (the last one ragged). Dynamic chunks:
// groups stop after different numbers of steps.
template <class Fn>
void for_each_group(const float* w, const HqqOutputs& out, int64_t n, int64_t k, int64_t group, int nthreads,
                    Fn&& fn) {
  const int64_t ng = (k + group - 1) / group;
  const int64_t total = n * ng;
#pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
  for (int64_t t = 0; t < total; ++t) {
    const int64_t off = (t / ng) * k + (t % ng) * group;
    const int64_t L = std::min(group, k - (t % ng) * group);
    fn(w + off, L, out.codes + off, out.scales + t, out.zeros + t, out.err + t, out.steps + t);
  }
}

// Entry points: every group of w (n, k), cut along k into groups of `group`
// (the last one ragged), solved independently; writes codes, the stored
// scale and zero (fp32), the group's squared error and its step count.
// Float zero points (hqq_solver.cpp).
void hqq_solve(const float* w, const HqqOutputs& out, int64_t n, int64_t k, int64_t group, const HqqParams& P,
               int nthreads);
// The scale solved without clipping around RTN's integer zero, then the zero
// moved at most zero_slack from it (hqq_integer_zero.cpp).
void hqq_solve_integer_zero(const float* w, const HqqOutputs& out, int64_t n, int64_t k, int64_t group,
                            const HqqParams& P, float zero_slack, int nthreads);

}  // namespace pyquant
