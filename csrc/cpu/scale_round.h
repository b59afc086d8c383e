// Rounding of per-group scalars (scales, zero points) to the dtype a format
// stores them in, as torch's .to(dtype) does; shared by the HQQ solvers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace pyquant {

// Scale dtype codes (pyquant/ops/_dtypes.py): 0 fp32, 1 fp16, 2 bf16.
// fp32 -> fp16/bf16 -> fp32, round to nearest even, overflow to inf.
inline float round_to_dtype(float x, int dtype) {
  if (dtype == 0 || !std::isfinite(x)) return x;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (dtype == 2) {  // bf16: keep the top 16 bits, ties to even
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    float r;
    std::memcpy(&r, &u, 4);
    return r;
  }
  const float a = std::fabs(x);
  if (a >= 65520.0f) return std::copysign(std::numeric_limits<float>::infinity(), x);  // past fp16's max 65504
  if (a < 6.103515625e-05f) {  // fp16 subnormal: multiples of 2^-24 (the scaling is exact)
    return std::nearbyint(x * 16777216.0f) * 5.9604644775390625e-08f;
  }
  u += 0xfffu + ((u >> 13) & 1u);  // 10 mantissa bits, ties to even; a carry moves the exponent
  u &= 0xffffe000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// The next value above x (finite, >= 0, already representable) in that dtype.
inline float next_up_in_dtype(float x, int dtype) {
  if (dtype == 0) return std::nextafter(x, std::numeric_limits<float>::infinity());
  if (dtype == 1 && x < 6.103515625e-05f) return x + 5.9604644775390625e-08f;  // fp16 subnormal step 2^-24
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += dtype == 2 ? 0x10000u : 0x2000u;  // one ulp of the 7 / 10 kept mantissa bits
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

}  // namespace pyquant
