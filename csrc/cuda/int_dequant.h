#pragma once
#include <cstdint>

namespace pyquant {
void int_dequant_cuda(uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t out, int64_t n, int64_t k,
                      int bits, int64_t group, int scale_dtype, int out_dtype, uintptr_t stream);
}
