// y in the dtype of half-precision x, written by the C++ entry points: the
// kernels still accumulate and store fp32 (into a CallScratch when y is fp16 /
// bf16), and one pass converts that into y, rounding to nearest even as
// torch's Tensor.to does (finite values and infinities bit for bit; a NaN stays
// a NaN). From Python the same conversion, y.to(dtype), cost 1.5-1.7 us a call
// at decode sizes: a sixth of a 576 x 576 Int4 product at M = 1 (Zen 5).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "pyquant/common.h"
#include "thread_scratch.h"

namespace pyquant {

// count fp32 values at src -> dtype (kF16 or kBF16) at dst.
void store_fp32_as(int dtype, const float* src, void* dst, int64_t count, int nthreads);

// kernel(float* y32) writes the count values of y in fp32; they land at y in
// y_dtype (kF32: written there directly).
template <typename Kernel>
void into_output(int y_dtype, uintptr_t y, int64_t count, int nthreads, Kernel&& kernel) {
  if (y_dtype == kF32) return kernel(reinterpret_cast<float*>(y));
  if (y_dtype != kF16 && y_dtype != kBF16)
    throw std::invalid_argument("y_dtype must be 0 (fp32), 1 (fp16) or 2 (bf16), got " + std::to_string(y_dtype));
  if (count <= 0) return;
  const CallScratch y32(count, Scratch::kYOutput);
  kernel(y32.get());
  store_fp32_as(y_dtype, y32.get(), reinterpret_cast<void*>(y), count, nthreads);
}

}  // namespace pyquant
