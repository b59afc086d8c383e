// Internal interface of the NF4 CPU kernels (nf4_dequant.cpp, nf4_matmul.cpp).
#pragma once
#include <cstdint>

#include "pyquant/nf4_decode.h"

namespace pyquant {
namespace nf4cpu {

// One packed NF4 weight (N, K): flat row-major blocks of block_size that may
// span rows (pyquant/formats/nf4.py).
struct Weight {
  const uint8_t* qweight;
  int64_t n, k, block_size;
  Nf4Scales scales;
};

// out[j] = W_flat[begin + j] for j < end - begin: exactly the reference's
// fp32 values (codebook * absmax, one multiply). Any begin/end, odd included.
void decode_range_scalar(const Weight& w, int64_t begin, int64_t end, float* out);
void decode_range_avx2(const Weight& w, int64_t begin, int64_t end, float* out);
void decode_range(const Weight& w, int64_t begin, int64_t end, float* out);

// out (N*K fp32) = dequantized weight.
void dequantize(const Weight& w, float* out, int nthreads);

// y (M, N) fp32 = x (M, K) fp32 @ W^T (+ bias fp32 (N,) if not null).
void qmatmul(const Weight& w, const float* x, int64_t m, const float* bias, float* y, int nthreads);

}  // namespace nf4cpu
}  // namespace pyquant
