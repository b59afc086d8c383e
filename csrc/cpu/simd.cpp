#include "simd.h"

#include <cstdlib>

namespace pyquant {
namespace {

Simd detect() {
#if PQ_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    const char* env = std::getenv("PYQUANT_SIMD");
    if (env && std::string(env) == "scalar") return Simd::kScalar;
    return Simd::kAvx2;
  }
#endif
  return Simd::kScalar;
}

Simd& current() {
  static Simd level = detect();
  return level;
}

}  // namespace

Simd simd_level() { return current(); }

bool set_simd_level(const std::string& level) {
  if (level == "scalar") {
    current() = Simd::kScalar;
    return true;
  }
  if (level == "best" || level == "avx2") {
    current() = Simd::kScalar;
    current() = detect();
    return level == "best" || current() == Simd::kAvx2;
  }
  return false;
}

std::string simd_name(Simd s) { return s == Simd::kAvx2 ? "avx2+fma" : "scalar"; }

}  // namespace pyquant
