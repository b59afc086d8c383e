// Internal interface between the GGUF CPU kernel files (dequant, matmul, bindings).
#pragma once
#include <algorithm>
#include <cstdint>

#include "simd.h"
#include "pyquant/gguf_blocks.h"

namespace pyquant {
namespace gguf {

// Threads worth waking for `work` items when each thread should get at least
// `min_per_thread`: waking a thread costs microseconds on an idle machine and
// milliseconds on an oversubscribed one, so small tensors run on one.
inline int threads_for(int64_t work, int64_t min_per_thread, int nthreads) {
  return int(std::max<int64_t>(1, std::min<int64_t>(nthreads, work / min_per_thread)));
}

// Decodes `nblocks` consecutive blocks into nblocks * block_size floats,
// bit-exact with gguf-py. Both levels give identical bits.
using DecodeRangeFn = void (*)(const uint8_t* src, float* dst, int64_t nblocks);
DecodeRangeFn decode_range_fn(int type, Simd level);  // nullptr for an unknown type

// Whole-tensor dequantization (blocks are contiguous across rows).
void dequantize(int type, const uint8_t* src, float* dst, int64_t nblocks, int nthreads);

// y (M, N) = x (M, K) @ W_hat.T (+ bias), fp32, W given as raw GGUF rows.
void qmatmul(int type, const float* x, const uint8_t* w, const float* bias, float* y, int64_t m, int64_t n,
             int64_t k, int nthreads);

}  // namespace gguf
}  // namespace pyquant
