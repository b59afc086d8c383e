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

// Bytes of one packed 32-code chunk.
PQ_HD int int_chunk_bytes(int bits) { return kIntChunk * bits / 8; }

// All 32 codes of one chunk (`c` points at the chunk) in order: one pass over
// the bytes instead of 32 int_code calls, for scalar unpack/dequantize.
PQ_HD void int_decode_chunk(const uint8_t* c, int bits, uint8_t* out) {
  switch (bits) {
    case 8:
      for (int j = 0; j < 32; ++j) out[j] = c[j];
      break;
    case 4:
      for (int j = 0; j < 16; ++j) {
        out[j] = c[j] & 0xF;
        out[j + 16] = c[j] >> 4;
      }
      break;
    case 2:
      for (int j = 0; j < 8; ++j) {
        out[j] = c[j] & 3;
        out[j + 8] = (c[j] >> 2) & 3;
        out[j + 16] = (c[j] >> 4) & 3;
        out[j + 24] = c[j] >> 6;
      }
      break;
    default: {  // 3 bits
      const uint32_t hi = uint32_t(c[8]) | uint32_t(c[9]) << 8 | uint32_t(c[10]) << 16 | uint32_t(c[11]) << 24;
      for (int j = 0; j < 8; ++j) {
        out[j] = c[j] & 3;
        out[j + 8] = (c[j] >> 2) & 3;
        out[j + 16] = (c[j] >> 4) & 3;
        out[j + 24] = c[j] >> 6;
      }
      for (int j = 0; j < 32; ++j) out[j] |= ((hi >> j) & 1) << 2;
    }
  }
}

}  // namespace pyquant
