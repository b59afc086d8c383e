// Internal interface between the GGUF CPU kernel files (dequant, matmul, bindings).
#pragma once
#include <cstdint>

#include "simd.h"
#include "pyquant/gguf_blocks.h"

namespace pyquant {
namespace gguf {

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
