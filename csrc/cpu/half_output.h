// y in the dtype of half-precision x, written by the C++ entry points: the
// kernels still accumulate and store fp32 (into a per-thread scratch when y is
// fp16 / bf16), and one pass converts that into y, rounding to nearest even as
// torch's Tensor.to does (finite values and infinities bit for bit; a NaN stays
// a NaN). From Python the same conversion, y.to(dtype), cost 1.5-1.7 us a call
// at decode sizes: a sixth of a 576 x 576 Int4 product at M = 1 (Zen 5).
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "pyquant/common.h"
#include "thread_scratch.h"

namespace pyquant {

// count fp32 values at src -> dtype (kF16 or kBF16) at dst.
void store_fp32_as(int dtype, const float* src, void* dst, int64_t count, int nthreads);

// Outputs up to this many values go through a kept per-thread scratch (1 MiB);
// larger ones through a buffer of their own, so a prefill's y is not held on to.
constexpr int64_t kOutputScratchFloats = int64_t(1) << 18;

// kernel(float* y32) writes the count values of y in fp32; they land at y in
// y_dtype (kF32: written there directly).
template <typename Kernel>
void into_output(int y_dtype, uintptr_t y, int64_t count, int nthreads, Kernel&& kernel) {
  if (y_dtype == kF32) return kernel(reinterpret_cast<float*>(y));
  if (y_dtype != kF16 && y_dtype != kBF16)
    throw std::invalid_argument("y_dtype must be 0 (fp32), 1 (fp16) or 2 (bf16), got " + std::to_string(y_dtype));
  if (count <= 0) return;
  std::unique_ptr<float[]> own;
  float* y32;
  if (count <= kOutputScratchFloats) {
    y32 = thread_scratch(count, Scratch::kYOutput);
  } else {
    own.reset(new float[size_t(count)]);
    y32 = own.get();
  }
  kernel(y32);
  store_fp32_as(y_dtype, y32, reinterpret_cast<void*>(y), count, nthreads);
}

}  // namespace pyquant
