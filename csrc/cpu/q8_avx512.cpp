// q8 kernels compiled for the avx512 level (see q8_impl.inc).
#include "simd.h"
#if PQ_X86
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>

#include "q8_kernels.h"

// GCC 12's AVX-512 headers start some intrinsics from an undefined vector,
// which -Wmaybe-uninitialized reports at every use.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
PQ_ISA_BEGIN(PQ_TARGET_STR_AVX512)
#define PQ_Q8_NS avx512
#define PQ_Q8_DOT 2
#include "q8_impl.inc"
#undef PQ_Q8_DOT
#undef PQ_Q8_NS
PQ_ISA_END

namespace pyquant {
namespace q8 {
const Table& table_avx512() { return avx512::table(); }
}  // namespace q8
}  // namespace pyquant
#endif  // PQ_X86
