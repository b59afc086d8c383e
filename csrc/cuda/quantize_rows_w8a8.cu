// Per-token int8 quantization of the activations for the Hopper W8A8 GEMM
// (w8a8_sm90.cu); the spec is pyquant.ops.reference.quantize_rows_int8, bit
// for bit. Experimental until a GPU run passes it.
//
// One block of 128 threads per row, two passes over the row (the second is
// served by L1/L2: a row is at most a few tens of KiB):
//   1. max |x| by 16-byte loads (8 fp16/bf16 or 4 fp32 per load), a warp
//      shuffle reduction, then the 4 warps' maxima through shared memory;
//   2. codes rint(x / scale) clamped to +-127, written 8 (or 4) bytes per
//      store, and their row sum for the GEMM's zero-point correction
//      corr = 128 * sum q (launchers_sm90.h).
// The divisions stay true IEEE divisions (__fdiv_rn): the spec divides, and
// x * (1 / scale) rounds differently for some x. They cost ~10 instructions
// per value next to a 2-byte load, still well under the memory time.
// Rows whose start is not 16-byte aligned (x a view, K * sizeof(T) not a
// multiple of 16) take the same kernel one value per load.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>

#include "cuda_check.h"
#include "cuda_common.cuh"
#include "launchers_sm90.h"
#include "pyquant/static_switch.h"

namespace pyquant {
namespace {

using cuda::to_float;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// n values of x starting at p as floats: one 16-byte load when kVec.
template <typename T, bool kVec>
struct Chunk {
  static constexpr int n = kVec ? 16 / sizeof(T) : 1;
  __device__ __forceinline__ static void load(const T* p, float* f) {
    if constexpr (kVec) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));  // one LDG.128 (a plain deref splits it in four)
      cuda::unpack16(v, static_cast<T*>(nullptr), f);
    } else {
      f[0] = to_float(p[0]);
    }
  }
};

// n codes (1, 4 or 8 bytes) with one store.
template <int n>
__device__ __forceinline__ void store_codes(int8_t* q, const int (&v)[n]) {
  if constexpr (n == 1) {
    q[0] = int8_t(v[0]);
  } else {
    uint32_t w[n / 4];
#pragma unroll
    for (int j = 0; j < n / 4; ++j)
      w[j] = (uint32_t(v[4 * j] & 0xff)) | (uint32_t(v[4 * j + 1] & 0xff) << 8) |
             (uint32_t(v[4 * j + 2] & 0xff) << 16) | (uint32_t(v[4 * j + 3] & 0xff) << 24);
    if constexpr (n == 4) {
      *reinterpret_cast<uint32_t*>(q) = w[0];
    } else {
      *reinterpret_cast<uint2*>(q) = make_uint2(w[0], w[1]);
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    quantize_rows_w8a8_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ scale,
                              int32_t* __restrict__ corr, int64_t k, int64_t kp) {
  using C = Chunk<T, kVec>;
  __shared__ float red_max[kWarps];
  __shared__ int red_sum[kWarps];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * k;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  float amax = 0.0f;
  for (int64_t i = int64_t(threadIdx.x) * C::n; i < k; i += int64_t(kThreads) * C::n) {
    float f[C::n];
    C::load(xr + i, f);
#pragma unroll
    for (int j = 0; j < C::n; ++j) amax = fmaxf(amax, fabsf(f[j]));
  }
  amax = cuda::warp_max(amax);
  if (lane == 0) red_max[warp] = amax;
  __syncthreads();
  amax = red_max[0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) amax = fmaxf(amax, red_max[i]);
  const float s = __fdiv_rn(amax, 127.0f);

  // K % C::n == 0 on the vector path, so a chunk is all inside K or all padding.
  int8_t* qr = q + row * kp;
  int sum = 0;
  for (int64_t i = int64_t(threadIdx.x) * C::n; i < kp; i += int64_t(kThreads) * C::n) {
    int v[C::n] = {};
    if (i < k && s > 0.0f) {
      float f[C::n];
      C::load(xr + i, f);
#pragma unroll
      for (int j = 0; j < C::n; ++j) {
        v[j] = int(fminf(fmaxf(rintf(__fdiv_rn(f[j], s)), -127.0f), 127.0f));  // rint: half to even, as torch
        sum += v[j];
      }
    }
    store_codes<C::n>(qr + i, v);
  }
  // |sum| <= 127 K: a warp's int32 sum is exact for any K below 16.9M.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) red_sum[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) total += red_sum[i];
    scale[row] = s;
    corr[row] = 128 * total;
  }
}

}  // namespace

void quantize_rows_w8a8_cuda(uintptr_t x, uintptr_t q, uintptr_t scale, uintptr_t corr, int64_t m, int64_t k,
                             int64_t kp, int x_dtype, uintptr_t stream) {
  if (m == 0) return;
  if (m > 0x7fffffff) throw std::invalid_argument("quantize_rows_w8a8_cuda: too many rows");
  if (kp < k || kp % 16) throw std::invalid_argument("quantize_rows_w8a8_cuda: kp must be >= K and a multiple of 16");
  if (q % 16) throw std::invalid_argument("quantize_rows_w8a8_cuda: q must be 16-byte aligned");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto qp = reinterpret_cast<int8_t*>(q);
  auto sp = reinterpret_cast<float*>(scale);
  auto cp = reinterpret_cast<int32_t*>(corr);
  const dim3 grid(static_cast<unsigned>(m));
  PQ_DTYPE_SWITCH(x_dtype, scalar_t, "quantize_rows_w8a8_cuda", [&] {
    const auto* xp = reinterpret_cast<const scalar_t*>(x);
    const bool vec = x % 16 == 0 && (k * int64_t(sizeof(scalar_t))) % 16 == 0;
    if (vec) {
      quantize_rows_w8a8_kernel<scalar_t, true><<<grid, kThreads, 0, s>>>(xp, qp, sp, cp, k, kp);
    } else {
      quantize_rows_w8a8_kernel<scalar_t, false><<<grid, kThreads, 0, s>>>(xp, qp, sp, cp, k, kp);
    }
    PQ_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace pyquant
