// NF4 (bitsandbytes layout) dequantization on the GPU, bit-exact with
// pyquant/ops/reference_nf4.py. Experimental until a GPU run passes it.
//
// Layout: the (N, K) weight flattened row-major, two codes per byte with the
// first value in the high nibble, one absmax per block of block_size values
// (fp32, or double-quantized: dyn_map[absmax_q[b]] * absmax_scale[b / 256] +
// offset, two separately rounded fp32 ops).
//
// Access pattern: thread i owns values 8i..8i+7, i.e. bytes 4i..4i+3 of the
// packed weight: a warp reads 128 contiguous bytes and writes 32 x 16 bytes
// (fp16/bf16: one 128-bit store per thread; fp32: two), so both streams are
// fully coalesced. The 8 values share one absmax (block_size is a power of two
// >= 32). The 16-entry codebook sits in shared memory: a constant-memory
// lookup with divergent indices would serialize across the warp.
//
// The per-block scale (plain or double-quantized) is the shared
// pyquant/nf4_decode.h Nf4Scales, also compiled into the CPU kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_check.h"
#include "cuda_common.cuh"
#include "launchers.h"
#include "pyquant/nf4_decode.h"
#include "pyquant/static_switch.h"

namespace pyquant {
namespace {

constexpr int kThreads = 256;

struct Nf4Params {
  const uint8_t* qweight;
  Nf4Scales scales;  // absmax or (absmax_q, absmax_scale, dyn_map, offset)
  const float* offset_ptr;  // double quantization: the fp32 offset, read on the device
  void* out;
  int64_t numel;
  int64_t block_size;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) nf4_dequant_kernel(Nf4Params p) {
  __shared__ float codebook[16];
  if (threadIdx.x < 16) codebook[threadIdx.x] = nf4_value(threadIdx.x);
  __syncthreads();

  const int64_t i0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * 8;
  if (i0 >= p.numel) return;
  Nf4Scales scales = p.scales;
  if (p.offset_ptr) scales.offset = *p.offset_ptr;
  const float absmax = scales(i0 / p.block_size);
  float v[8];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    // The last byte of an odd-sized weight holds one value; never read past the tensor.
    const uint32_t byte = (i0 + 2 * j < p.numel) ? p.qweight[i0 / 2 + j] : 0u;
    v[2 * j] = __fmul_rn(codebook[byte >> 4], absmax);
    v[2 * j + 1] = __fmul_rn(codebook[byte & 15u], absmax);
  }
  T* out = static_cast<T*>(p.out) + i0;
  if (i0 + 8 <= p.numel) {
    cuda::store8(out, v);
  } else {
    for (int j = 0; j < 8 && i0 + j < p.numel; ++j) out[j] = cuda::from_float<T>(v[j]);
  }
}

}  // namespace

void nf4_dequant_cuda(uintptr_t qweight, uintptr_t absmax, uintptr_t absmax_q, uintptr_t absmax_scale,
                      uintptr_t absmax_offset, uintptr_t dyn_map, uintptr_t out, int64_t numel, int64_t block_size,
                      int out_dtype, uintptr_t stream) {
  if (numel == 0) return;
  if (block_size < 32 || (block_size & (block_size - 1)))
    throw std::invalid_argument("nf4_dequant_cuda: block_size must be a power of two >= 32");
  if (out % 16) throw std::invalid_argument("nf4_dequant_cuda: out must be 16-byte aligned");
  Nf4Params p;
  p.qweight = reinterpret_cast<const uint8_t*>(qweight);
  p.scales.absmax = reinterpret_cast<const float*>(absmax);
  p.scales.absmax_q = reinterpret_cast<const uint8_t*>(absmax_q);
  p.scales.absmax_scale = reinterpret_cast<const float*>(absmax_scale);
  p.scales.dyn_map = reinterpret_cast<const float*>(dyn_map);
  p.scales.offset = 0.0f;
  p.offset_ptr = absmax ? nullptr : reinterpret_cast<const float*>(absmax_offset);
  p.out = reinterpret_cast<void*>(out);
  p.numel = numel;
  p.block_size = block_size;
  const int64_t blocks = cuda::ceil_div(cuda::ceil_div(numel, 8), kThreads);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  PQ_DTYPE_SWITCH(out_dtype, scalar_t, "nf4_dequant_cuda", [&] {
    nf4_dequant_kernel<scalar_t><<<blocks, kThreads, 0, s>>>(p);
    PQ_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace pyquant
