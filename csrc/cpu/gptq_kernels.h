// Internal interface of the GPTQ CPU kernel (gptq_block.cpp), bound in
// gptq_bindings.cpp.
#pragma once
#include <cstdint>

namespace pyquant {

// One block of GPTQ's column loop, fp32 row-major: w (n, b) row stride ldw,
// updated in place; hinv (>= stop, b) row stride ldh; scale/zero (n, groups)
// row stride ldsz; codes uint8 / err fp32 (n, stop - start) row strides
// ldc / lde. Columns [start, stop) are quantized in order, group g covering
// columns start + g * group_len onwards.
struct GptqBlockArgs {
  float* w;
  int64_t ldw;
  int64_t n, b;
  const float* hinv;
  int64_t ldh;
  const float* scale;
  const float* zero;
  int64_t ldsz;
  int64_t start, stop, group_len;
  float maxq;
  uint8_t* codes;
  int64_t ldc;
  float* err;
  int64_t lde;
};

// Spec: pyquant/algorithms/gptq.py::gptq_block_update_reference. nthreads >= 1.
void gptq_block_update(const GptqBlockArgs& a, int nthreads);

}  // namespace pyquant
