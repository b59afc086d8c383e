// Fused HQQ solver on the GPU (experimental until a GPU run passes
// tests/algorithms/test_hqq.py -m gpu). One warp owns one group and runs all
// proximal steps of it in this single launch; every pass over the group is a
// lane-strided loop over at most a few KB that stay in L1, and each step
// needs three warp reductions (zero-point sum, squared error, max |error|).
//
// Arithmetic follows pyquant/algorithms/hqq_reference.py: round half to even
// (rintf), and the per-element expressions use __fmul_rn/__fadd_rn, which nvcc
// never contracts into FMAs (it would by default), so codes match the spec up
// to the order of the sums.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda_check.h"
#include "cuda_common.cuh"
#include "launchers.h"

namespace pyquant {
namespace {

constexpr int kWarps = 4;  // groups per block

// x rounded to the scale dtype (RNE, as torch's .to()) and widened back.
__device__ __forceinline__ float to_stored(float x, int dtype) {
  if (dtype == kF16) return __half2float(__float2half_rn(x));
  if (dtype == kBF16) return __bfloat162float(__float2bfloat16_rn(x));
  return x;
}

__device__ __forceinline__ float qz(float w, float sinv, float z, float maxq) {
  return fminf(fmaxf(rintf(__fadd_rn(__fmul_rn(w, sinv), z)), 0.0f), maxq);
}

// w - (q - z) * s with the codes the (s, z, sinv) triple gives
__device__ __forceinline__ float resid(float w, float q, float z, float s) {
  return __fsub_rn(w, __fmul_rn(__fsub_rn(q, z), s));
}

__device__ float sq_err(const float* w, int64_t L, int lane, float s, float z, float sinv, float maxq) {
  float e = 0.0f;
  for (int64_t i = lane; i < L; i += 32) {
    const float d = resid(w[i], qz(w[i], sinv, z, maxq), z, s);
    e = __fadd_rn(e, __fmul_rn(d, d));
  }
  return cuda::warp_sum(e);
}

__global__ void hqq_solve_kernel(const float* __restrict__ W, uint8_t* __restrict__ codes, float* __restrict__ scales,
                                 float* __restrict__ zeros, float* __restrict__ err, int32_t* __restrict__ steps_out,
                                 const float* __restrict__ sched, int64_t n, int64_t k, int64_t group, int64_t ng,
                                 float maxq, int dtype, int iters, float thr_last, float p1, bool kappa_one,
                                 bool early_stop, float tiny) {
  const int lane = threadIdx.x & 31;
  const int64_t gid = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (gid >= n * ng) return;  // uniform per warp: the shuffles below see full warps
  const int64_t row = gid / ng, c0 = (gid % ng) * group;
  const int64_t L = group < k - c0 ? group : k - c0;
  const float* w = W + row * k + c0;

  float lo = INFINITY, hi = -INFINITY;
  for (int64_t i = lane; i < L; i += 32) {
    lo = fminf(lo, w[i]);
    hi = fmaxf(hi, w[i]);
  }
  lo = cuda::warp_min(lo);
  hi = cuda::warp_max(hi);

  // candidate 1: pyquant's RTN
  const float lo_r = fminf(lo, 0.0f), hi_r = fmaxf(hi, 0.0f);
  float s_r = to_stored((hi_r - lo_r) / maxq, dtype);
  if (!(s_r > 0.0f)) s_r = tiny;
  const float z_r = fminf(fmaxf(rintf(-lo_r / s_r), 0.0f), maxq);
  const float sinv_r = 1.0f / s_r;
  const float e_r = sq_err(w, L, lane, s_r, z_r, sinv_r, maxq);

  // candidate 2: HQQ from hqq's min/max init
  const float sinv_h = maxq / (hi - lo);
  const float s32 = 1.0f / sinv_h;
  const float s_st = to_stored(s32, dtype);
  const float sinv_d = 1.0f / s32, sinv_e = 1.0f / s_st;
  float zd = __fmul_rn(-lo, sinv_d);
  const bool ok = hi > lo && isfinite(s32) && s_st > 0.0f && isfinite(s_st) && isfinite(sinv_e) &&
                  isfinite(sinv_d) && isfinite(to_stored(zd, dtype));
  float best = INFINITY, best_z = 0.0f;
  int32_t steps = 0;
  if (ok) {
    for (int it = 0;; ++it) {
      const float zs = to_stored(zd, dtype);
      const float e = sq_err(w, L, lane, s_st, zs, sinv_e, maxq);
      if (e < best) {
        best = e;
        best_z = zs;
      }
      if (it == iters) break;
      const float inv_beta = sched[it], thr = sched[iters + it];
      float zsum = 0.0f, maxd = 0.0f;
      for (int64_t i = lane; i < L; i += 32) {
        const float x = w[i];
        const float q = qz(x, sinv_d, zd, maxq);
        const float d = resid(x, q, zd, s32);
        const float a = fabsf(d);
        float we = 0.0f;
        if (a > thr) {
          const float v = fmaxf(__fsub_rn(a, __fmul_rn(powf(fmaxf(a, 1e-30f), p1), inv_beta)), 0.0f);
          we = d < 0.0f ? -v : v;
        }
        zsum = __fadd_rn(zsum, __fsub_rn(q, __fmul_rn(__fsub_rn(x, we), sinv_d)));
        maxd = fmaxf(maxd, a);
      }
      zsum = cuda::warp_sum(zsum);
      maxd = cuda::warp_max(maxd);
      ++steps;
      const float znew = zsum / static_cast<float>(L);
      const bool fixed = early_stop && znew == zd && (kappa_one || maxd <= thr_last);
      zd = znew;
      if (fixed) break;
    }
  }

  const bool use_h = best <= e_r;
  const float s = use_h ? s_st : s_r, z = use_h ? best_z : z_r, sinv = use_h ? sinv_e : sinv_r;
  uint8_t* out = codes + row * k + c0;
  for (int64_t i = lane; i < L; i += 32) out[i] = static_cast<uint8_t>(qz(w[i], sinv, z, maxq));
  if (lane == 0) {
    scales[gid] = s;
    zeros[gid] = z;
    err[gid] = use_h ? best : e_r;
    steps_out[gid] = steps;
  }
}

}  // namespace

void hqq_solve_cuda(uintptr_t w, uintptr_t codes, uintptr_t scales, uintptr_t zeros, uintptr_t err, uintptr_t steps,
                    int64_t n, int64_t k, int64_t group, int bits, int scale_dtype, int iters, uintptr_t schedule,
                    double lp_norm, double thr_last, bool kappa_one, bool early_stop, uintptr_t stream) {
  const int64_t ng = cuda::ceil_div(k, group);
  const int64_t total = n * ng;
  if (total == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const float* sched = reinterpret_cast<const float*>(schedule);
  const float tiny = scale_dtype == kF32 ? 1.17549435e-38f : 6.103515625e-05f;  // RTN's fallback scale
  const int64_t blocks = cuda::ceil_div(total, kWarps);
  hqq_solve_kernel<<<static_cast<unsigned>(blocks), kWarps * 32, 0, s>>>(
      reinterpret_cast<const float*>(w), reinterpret_cast<uint8_t*>(codes), reinterpret_cast<float*>(scales),
      reinterpret_cast<float*>(zeros), reinterpret_cast<float*>(err), reinterpret_cast<int32_t*>(steps), sched, n, k,
      group, ng, static_cast<float>((1 << bits) - 1), scale_dtype, iters, static_cast<float>(thr_last),
      static_cast<float>(lp_norm) - 1.0f, kappa_one, early_stop, tiny);
  PQ_CUDA_CHECK(cudaGetLastError());
}

}  // namespace pyquant
