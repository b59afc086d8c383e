// Internal interface of the k-quant quantizer (kquant_quantize.cpp), bound in
// kquant_bindings.cpp.
#pragma once
#include <cstdint>

namespace pyquant {

// x fp32 (nrows, k) contiguous, k % 256 == 0; qw fp32 (k,) importance or
// null; out uint8 (nrows, k / 256 * type size) GGUF blocks of ggml_type
// (Q2_K..Q6_K). Throws std::invalid_argument for any other type.
void kquant_quantize(int ggml_type, const float* x, const float* qw, int64_t nrows, int64_t k, uint8_t* out,
                     int nthreads);

}  // namespace pyquant
