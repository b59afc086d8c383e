// q8 kernels compiled for the avx2 level (see q8_impl.inc).
#include "simd.h"
#if PQ_X86
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>

#include "q8_kernels.h"

PQ_ISA_BEGIN(PQ_TARGET_STR_AVX2)
#define PQ_Q8_NS avx2
#define PQ_Q8_DOT 0
#include "q8_impl.inc"
#undef PQ_Q8_DOT
#undef PQ_Q8_NS
PQ_ISA_END

namespace pyquant {
namespace q8 {
const Table& table_avx2() { return avx2::table(); }
}  // namespace q8
}  // namespace pyquant
#endif  // PQ_X86
