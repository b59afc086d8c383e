// Small device helpers shared by the CUDA kernels of this folder (device-only,
// so they live here and not in csrc/include/pyquant, whose headers are also
// compiled into the CPU code and tested there).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "pyquant/common.h"

namespace pyquant {
namespace cuda {

// Output conversion with round-to-nearest-even, the rounding of torch's .to().
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Element i of a float array stored as `dtype` (pyquant::DType), with the
// hardware conversions: the shared load_float of pyquant/common.h converts
// fp16 in software (it is also CPU code), tens of instructions per call.
__device__ __forceinline__ float load_scale(const void* p, int64_t i, int dtype) {
  const uint16_t raw = static_cast<const uint16_t*>(p)[dtype == kF32 ? 0 : i];
  if (dtype == kF16) return __half2float(__ushort_as_half(raw));
  if (dtype == kBF16) return __uint_as_float(uint32_t(raw) << 16);
  return static_cast<const float*>(p)[i];
}

// A float (exactly representable) in both halves of a half2 / bfloat162.
template <typename P>
__device__ __forceinline__ P float2_to_pair(float v);
template <>
__device__ __forceinline__ __half2 float2_to_pair<__half2>(float v) { return __float2half2_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat162 float2_to_pair<__nv_bfloat162>(float v) { return __float2bfloat162_rn(v); }

// 16 bytes of T (8 halves / 8 bfloat16 / 4 floats) -> floats.
__device__ __forceinline__ void unpack16(const uint4& v, __half* /*tag*/, float* f) {
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = __half22float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}
__device__ __forceinline__ void unpack16(const uint4& v, __nv_bfloat16* /*tag*/, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}
__device__ __forceinline__ void unpack16(const uint4& v, float* /*tag*/, float* f) {
  f[0] = __uint_as_float(v.x);
  f[1] = __uint_as_float(v.y);
  f[2] = __uint_as_float(v.z);
  f[3] = __uint_as_float(v.w);
}

// Reads 8 consecutive T from 16-byte aligned shared memory as floats.
template <typename T>
__device__ __forceinline__ void load8_as_float(const T* p, float* f) {
  constexpr int kPer16 = 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < 8 / kPer16; ++i) {
    const uint4 v = *reinterpret_cast<const uint4*>(p + i * kPer16);
    unpack16(v, static_cast<T*>(nullptr), f + i * kPer16);
  }
}

// Packs 8 floats into 8 outputs of type T (RNE) and stores them with 16-byte
// stores; p must be 16-byte aligned.
__device__ __forceinline__ void store8(__half* p, const float* f) {
  uint4 v;
  __half2* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __halves2half2(__float2half_rn(f[2 * i]), __float2half_rn(f[2 * i + 1]));
  *reinterpret_cast<uint4*>(p) = v;
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float* f) {
  uint4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i)
    h[i] = __halves2bfloat162(__float2bfloat16_rn(f[2 * i]), __float2bfloat16_rn(f[2 * i + 1]));
  *reinterpret_cast<uint4*>(p) = v;
}
__device__ __forceinline__ void store8(float* p, const float* f) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Group index of column c is c >> group_shift(group, k): 31 when one group
// spans the row (group -1, or group >= k), log2(group) for a power of two
// >= 32, and -1 for a size the kernels do not take (the caller throws).
inline int group_shift(int64_t group, int64_t k) {
  if (group == -1 || group >= k) return 31;
  if (group < 32 || (group & (group - 1))) return -1;
  int s = 0;
  while ((int64_t(1) << s) < group) ++s;
  return s;
}

}  // namespace cuda
}  // namespace pyquant
