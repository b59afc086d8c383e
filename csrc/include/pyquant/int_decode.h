// Bit layout of the Int format (see pyquant/formats/int_format.py): code k of a
// packed row, for any bit width. Scalar and slow on purpose: the CPU reference
// path and the CUDA kernels use it, and SIMD kernels are tested against it.
#pragma once
#include "pyquant/common.h"

namespace pyquant {

constexpr int kIntChunk = 32;  // codes per packing chunk

PQ_HD int int_row_bytes(int64_t k, int bits) {
  return int(((k + kIntChunk - 1) / kIntChunk) * kIntChunk * bits / 8);
}

PQ_HD uint32_t int_code(const uint8_t* row, int64_t k, int bits) {
  const int64_t chunk = k / kIntChunk;
  const int j = int(k % kIntChunk);
  switch (bits) {
    case 8:
      return row[k];
    case 4: {
      const uint8_t* c = row + chunk * 16;
      return j < 16 ? (c[j] & 0xF) : (c[j - 16] >> 4);
    }
    case 2: {
      const uint8_t* c = row + chunk * 8;
      return (c[j & 7] >> (2 * (j >> 3))) & 3;
    }
    default: {  // 3 bits: 2-bit plane then a 32-bit high-bit plane
      const uint8_t* c = row + chunk * 12;
      const uint32_t lo = (c[j & 7] >> (2 * (j >> 3))) & 3;
      const uint32_t hi = (c[8 + (j >> 3)] >> (j & 7)) & 1;
      return lo | (hi << 2);
    }
  }
}

}  // namespace pyquant
