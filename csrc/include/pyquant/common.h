// Shared by the CPU and CUDA code: qualifiers, dtype codes, scalar conversions.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PQ_HD __host__ __device__ __forceinline__
#else
#define PQ_HD inline
#endif

namespace pyquant {

// Codes for the float dtypes crossing the Python/C++ boundary
// (pyquant/ops/_dtypes.py holds the same table).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// IEEE binary16 -> binary32, exact, without F16C (also valid device code).
PQ_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

PQ_HD float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// Reads element i of a float array stored as `dtype`.
PQ_HD float load_float(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case kF16:
      return half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    case kBF16:
      return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

}  // namespace pyquant
