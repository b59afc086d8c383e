// Run-time choice between AVX2+FMA and scalar code paths.
#pragma once
#include <string>

namespace pyquant {

enum class Simd { kScalar = 0, kAvx2 = 1 };

// The level kernels use: the best the CPU supports, unless lowered with
// set_simd_level("scalar") (tests run both paths) or PYQUANT_SIMD=scalar.
Simd simd_level();
bool set_simd_level(const std::string& level);
std::string simd_name(Simd s);

}  // namespace pyquant

#if defined(__x86_64__) || defined(_M_X64)
#define PQ_X86 1
#define PQ_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define PQ_X86 0
#define PQ_TARGET_AVX2
#endif
