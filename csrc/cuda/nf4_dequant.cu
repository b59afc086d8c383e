// NF4 (bitsandbytes layout) dequantization on the GPU, bit-exact with
// pyquant/ops/reference_nf4.py. Experimental until a GPU run passes it.
//
// Layout: the (N, K) weight flattened row-major, two codes per byte with the
// first value in the high nibble, one absmax per block of block_size values
// (fp32, or double-quantized: dyn_map[absmax_q[b]] * absmax_scale[b / 256] +
// offset, two separately rounded fp32 ops).
//
// Access pattern (copy bandwidth): thread i owns values 32i..32i+31, i.e. the
// 16 bytes 16i..16i+15 of the packed weight, read with one 128-bit streaming
// load (no byte is read twice), and writes them with 128-bit stores (4 at
// fp16/bf16, 8 at fp32): both streams fully coalesced. The 32 values share one
// absmax (block_size is a power of two >= 32), computed once. The 16-entry
// codebook sits in shared memory (16 words in 16 banks: a warp's lookups never
// conflict; constant memory would serialize divergent indices); each code is
// masked straight into its byte offset there. A weight whose size is not a
// multiple of 32 ends in one partial chunk, read and written byte by byte.
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

  const int64_t i0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * 32;
  if (i0 >= p.numel) return;
  Nf4Scales scales = p.scales;
  if (p.offset_ptr) scales.offset = *p.offset_ptr;
  const float absmax = scales(i0 >> (__ffsll(p.block_size) - 1));  // block_size: a power of two
  T* out = static_cast<T*>(p.out) + i0;
  const uint8_t* cb = reinterpret_cast<const uint8_t*>(codebook);
  if (i0 + 32 <= p.numel) {
    const uint4 q = __ldcs(reinterpret_cast<const uint4*>(p.qweight + i0 / 2));
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
    float v[32];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        // byte 4i+e holds values 8i+2e (high nibble) and 8i+2e+1 (low nibble);
        // each nibble is masked into the byte offset of its codebook entry
        const uint32_t hi = (words[i] >> (8 * e + 2)) & 0x3cu, lo = (words[i] << 2 >> (8 * e)) & 0x3cu;
        v[8 * i + 2 * e] = __fmul_rn(*reinterpret_cast<const float*>(cb + hi), absmax);
        v[8 * i + 2 * e + 1] = __fmul_rn(*reinterpret_cast<const float*>(cb + lo), absmax);
      }
#pragma unroll
    for (int j = 0; j < 4; ++j) cuda::store8(out + 8 * j, v + 8 * j);
  } else {
    for (int j = 0; i0 + j < p.numel; ++j) {
      const uint32_t byte = p.qweight[(i0 + j) / 2];
      out[j] = cuda::from_float<T>(__fmul_rn(codebook[(j & 1) ? byte & 15u : byte >> 4], absmax));
    }
  }
}

}  // namespace

void nf4_dequant_cuda(uintptr_t qweight, uintptr_t absmax, uintptr_t absmax_q, uintptr_t absmax_scale,
                      uintptr_t absmax_offset, uintptr_t dyn_map, uintptr_t out, int64_t numel, int64_t block_size,
                      int out_dtype, uintptr_t stream) {
  if (numel == 0) return;
  if (block_size < 32 || (block_size & (block_size - 1)))
    throw std::invalid_argument("nf4_dequant_cuda: block_size must be a power of two >= 32");
  if (out % 16 || qweight % 16)
    throw std::invalid_argument("nf4_dequant_cuda: qweight and out must be 16-byte aligned");
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
  const int64_t blocks = cuda::ceil_div(cuda::ceil_div(numel, 32), kThreads);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  PQ_DTYPE_SWITCH(out_dtype, scalar_t, "nf4_dequant_cuda", [&] {
    nf4_dequant_kernel<scalar_t><<<blocks, kThreads, 0, s>>>(p);
    PQ_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace pyquant
