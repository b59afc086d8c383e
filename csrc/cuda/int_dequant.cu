// Int format dequantization on the GPU (experimental until a GPU run passes it).
// One thread per output element; the decode is the shared int_code() helper so
// the CPU tests exercise the same bit handling.
#include "cuda_check.h"
#include "cuda_common.cuh"
#include "launchers.h"
#include "pyquant/int_decode.h"
#include "pyquant/static_switch.h"

namespace pyquant {
namespace {

using cuda::from_float;

template <typename Out>
__global__ void int_dequant_kernel(const uint8_t* __restrict__ qweight, const void* __restrict__ scales,
                                   const void* __restrict__ zeros, Out* __restrict__ out, int64_t n, int64_t k,
                                   int bits, int64_t group, int64_t ngroups, int scale_dtype) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * k) return;
  const int64_t row = idx / k, col = idx % k, g = col / group;
  const uint8_t* prow = qweight + row * int_row_bytes(k, bits);
  const float s = load_float(scales, row * ngroups + g, scale_dtype);
  const float z = zeros ? load_float(zeros, row * ngroups + g, scale_dtype) : float(1 << (bits - 1));
  out[idx] = from_float<Out>((float(int_code(prow, col, bits)) - z) * s);
}

}  // namespace

void int_dequant_cuda(uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t out, int64_t n, int64_t k,
                      int bits, int64_t group, int scale_dtype, int out_dtype, uintptr_t stream) {
  const int64_t ngroups = cuda::ceil_div(k, group);
  const int64_t total = n * k;
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = cuda::ceil_div(total, threads);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto q = reinterpret_cast<const uint8_t*>(qweight);
  auto sc = reinterpret_cast<const void*>(scales);
  auto z = reinterpret_cast<const void*>(zeros);
  PQ_DTYPE_SWITCH(out_dtype, scalar_t, "int_dequant_cuda", [&] {
    int_dequant_kernel<<<blocks, threads, 0, s>>>(q, sc, z, reinterpret_cast<scalar_t*>(out), n, k, bits, group,
                                                  ngroups, scale_dtype);
    PQ_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace pyquant
