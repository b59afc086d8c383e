// GGUF (llama.cpp) block formats: byte layouts and scalar per-block decoding.
//
// Shared by the CPU kernels (scalar fallback, and the oracle the SIMD paths
// are tested against) and the CUDA kernels. Blocks are read as bytes at fixed
// offsets, never through a struct cast: type sizes such as 18 or 22 bytes
// leave fp16 fields at odd 2-byte alignments that a struct load would
// mis-align on the GPU.
//
// Exactness: every decoder reproduces gguf-py's fp32 arithmetic
// (gguf/quants.py) bit for bit. The values are fp16 scales times small
// integers, so every product here is exact in fp32: at most 23 significant
// bits (Q6_K: 11-bit fp16 significand x 7-bit scale x 5-bit code), and the
// magnitudes stay between 2^-24 and 2^28, far from fp32 under/overflow. Only
// the final add/sub of an offset (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) rounds. That is why a fused
// multiply-add gives the same result as gguf's rounded product followed by a
// sum, and why CPU and CUDA agree whether or not the compiler contracts.
// PQ_FMUL still keeps the product explicit on CUDA (nvcc contracts by default)
// so the code says exactly which operations gguf performs.
#pragma once
#include "pyquant/common.h"

#if defined(__CUDA_ARCH__)  // the device pass of nvcc
#define PQ_FMUL(a, b) __fmul_rn((a), (b))
#else
#define PQ_FMUL(a, b) ((a) * (b))
#endif

namespace pyquant {
namespace gguf {

// Block type codes crossing the Python/C++ boundary: the ggml_type enum
// values (pyquant/formats/gguf.py BLOCK_TYPES[...].ggml_type).
enum Type : int {
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
};

constexpr int kQK = 256;  // weights per k-quant super-block

// Byte offsets inside each block (little-endian fields, as in the file).
struct LayoutQ4_0 { enum { kBlock = 32, kBytes = 18, kD = 0, kQs = 2 }; };
struct LayoutQ4_1 { enum { kBlock = 32, kBytes = 20, kD = 0, kM = 2, kQs = 4 }; };
struct LayoutQ5_0 { enum { kBlock = 32, kBytes = 22, kD = 0, kQh = 2, kQs = 6 }; };
struct LayoutQ5_1 { enum { kBlock = 32, kBytes = 24, kD = 0, kM = 2, kQh = 4, kQs = 8 }; };
struct LayoutQ8_0 { enum { kBlock = 32, kBytes = 34, kD = 0, kQs = 2 }; };
struct LayoutQ2_K { enum { kBlock = 256, kBytes = 84, kScales = 0, kQs = 16, kD = 80, kDmin = 82 }; };
struct LayoutQ3_K { enum { kBlock = 256, kBytes = 110, kHmask = 0, kQs = 32, kScales = 96, kD = 108 }; };
struct LayoutQ4_K { enum { kBlock = 256, kBytes = 144, kD = 0, kDmin = 2, kScales = 4, kQs = 16 }; };
struct LayoutQ5_K { enum { kBlock = 256, kBytes = 176, kD = 0, kDmin = 2, kScales = 4, kQh = 16, kQs = 48 }; };
struct LayoutQ6_K { enum { kBlock = 256, kBytes = 210, kQl = 0, kQh = 128, kScales = 192, kD = 208 }; };

// Q2_K..Q6_K: 256-value super-blocks (the k-quants); the others 32 values.
PQ_HD constexpr bool is_kquant(int type) {
  return type == kQ2_K || type == kQ3_K || type == kQ4_K || type == kQ5_K || type == kQ6_K;
}

PQ_HD constexpr int block_size(int type) { return is_kquant(type) ? kQK : 32; }

PQ_HD int type_size(int type) {
  switch (type) {
    case kQ4_0: return LayoutQ4_0::kBytes;
    case kQ4_1: return LayoutQ4_1::kBytes;
    case kQ5_0: return LayoutQ5_0::kBytes;
    case kQ5_1: return LayoutQ5_1::kBytes;
    case kQ8_0: return LayoutQ8_0::kBytes;
    case kQ2_K: return LayoutQ2_K::kBytes;
    case kQ3_K: return LayoutQ3_K::kBytes;
    case kQ4_K: return LayoutQ4_K::kBytes;
    case kQ5_K: return LayoutQ5_K::kBytes;
    case kQ6_K: return LayoutQ6_K::kBytes;
    default: return 0;
  }
}

PQ_HD bool valid_type(int type) { return type_size(type) != 0; }

// Byte-wise little-endian loads: valid at any alignment, on host and device.
PQ_HD uint32_t load_u16le(const uint8_t* p) { return uint32_t(p[0]) | (uint32_t(p[1]) << 8); }
PQ_HD uint32_t load_u32le(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}
PQ_HD float load_f16(const uint8_t* p) { return half_bits_to_float(uint16_t(load_u16le(p))); }

// ---- integer codes: element i of a block, as gguf-py computes it ---------

// Q4_0 / Q4_1: byte j holds element j (low nibble) and j + 16 (high nibble).
PQ_HD int nibble32(const uint8_t* qs, int i) { return (qs[i & 15] >> (4 * (i >> 4))) & 0xF; }

// Q5_0 / Q5_1: the 5th bit of element i is bit i of the 32-bit qh word.
PQ_HD int q5_code(const uint8_t* qh, const uint8_t* qs, int i) {
  return nibble32(qs, i) | (int((load_u32le(qh) >> i) & 1u) << 4);
}

// Q2_K / Q3_K low bits: 128 weights per 32 bytes, shifted by 0, 2, 4, 6.
PQ_HD int k_2bit(const uint8_t* qs, int i) {
  const int half = i >> 7, r = i & 127;
  return (qs[half * 32 + (r & 31)] >> (2 * (r >> 5))) & 3;
}

// Q3_K: the 3rd bit of element i is bit (i / 32) of hmask[i % 32]; a clear
// bit means "subtract 4" (the format stores the bit inverted).
PQ_HD int q3k_code(const uint8_t* blk, int i) {
  const int lo = k_2bit(blk + LayoutQ3_K::kQs, i);
  const int h = (blk[LayoutQ3_K::kHmask + (i & 31)] >> (i >> 5)) & 1;
  return lo - ((h ^ 1) << 2);
}

// Q3_K 6-bit scale j (0..15), already offset to -32..31.
PQ_HD int q3k_scale(const uint8_t* s, int j) {
  const int lo = (s[j & 7] >> (4 * (j >> 3))) & 0xF;
  const int hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
  return (lo | (hi << 4)) - 32;
}

// Q4_K / Q5_K 6-bit scale and min of sub-block j (0..7), from the 12 packed bytes.
PQ_HD void k_scale_min(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// All 8 (scale, min) pairs of a Q4_K/Q5_K block at once, four bytes per
// 32-bit word (byte j of sc[0] is scale j, byte j of sc[1] is scale 4 + j;
// the same for m), for SIMD code. Bytes 0-3 hold scales 0-3 in their low 6
// bits and the top 2 bits of scales 4-7; bytes 4-7 do the same for the mins;
// bytes 8-11 hold the low 4 bits of scale 4+j (low nibble) and min 4+j (high).
PQ_HD void k_scales_mins(const uint8_t* s, uint32_t sc[2], uint32_t m[2]) {
  const uint32_t a = load_u32le(s), b = load_u32le(s + 4), c = load_u32le(s + 8);
  sc[0] = a & 0x3F3F3F3Fu;
  m[0] = b & 0x3F3F3F3Fu;
  sc[1] = (c & 0x0F0F0F0Fu) | ((a >> 2) & 0x30303030u);
  m[1] = ((c >> 4) & 0x0F0F0F0Fu) | ((b >> 2) & 0x30303030u);
}

// All 16 Q3_K scales as unsigned 6-bit bytes (subtract 32 for the value),
// four per word: word w holds scales 4w..4w+3.
PQ_HD void q3k_scales_all(const uint8_t* s, uint32_t out[4]) {
  const uint32_t l0 = load_u32le(s), l1 = load_u32le(s + 4), h = load_u32le(s + 8);
  out[0] = (l0 & 0x0F0F0F0Fu) | ((h & 0x03030303u) << 4);
  out[1] = (l1 & 0x0F0F0F0Fu) | (((h >> 2) & 0x03030303u) << 4);
  out[2] = ((l0 >> 4) & 0x0F0F0F0Fu) | (((h >> 4) & 0x03030303u) << 4);
  out[3] = ((l1 >> 4) & 0x0F0F0F0Fu) | (((h >> 6) & 0x03030303u) << 4);
}

// Q4_K: 4 chunks of 32 bytes; chunk c holds sub-block 2c (low nibbles) and 2c+1 (high).
PQ_HD int q4k_code(const uint8_t* qs, int i) {
  const int sub = i >> 5;
  return (qs[(sub >> 1) * 32 + (i & 31)] >> (4 * (sub & 1))) & 0xF;
}

// Q5_K: Q4_K nibbles plus bit `sub` of qh[i % 32].
PQ_HD int q5k_code(const uint8_t* qh, const uint8_t* qs, int i) {
  return q4k_code(qs, i) | (((qh[i & 31] >> (i >> 5)) & 1) << 4);
}

// Q6_K: per 128 weights, 64 ql bytes (nibbles: elements r and r + 64) and 32
// qh bytes (2-bit pairs: elements r, r+32, r+64, r+96); value -32..31.
PQ_HD int q6k_code(const uint8_t* blk, int i) {
  const int half = i >> 7, r = i & 127;
  const int lo = (blk[LayoutQ6_K::kQl + half * 64 + (r & 63)] >> (4 * (r >> 6))) & 0xF;
  const int hi = (blk[LayoutQ6_K::kQh + half * 32 + (r & 31)] >> (2 * (r >> 5))) & 3;
  return (lo | (hi << 4)) - 32;
}

// ---- scalar block decoders: out[0..block_size) in gguf-py's fp32 order ----

PQ_HD void dequant_block_q4_0(const uint8_t* b, float* out) {
  const float d = load_f16(b + LayoutQ4_0::kD);
  for (int i = 0; i < 32; ++i) out[i] = PQ_FMUL(d, float(nibble32(b + LayoutQ4_0::kQs, i) - 8));
}

PQ_HD void dequant_block_q4_1(const uint8_t* b, float* out) {
  const float d = load_f16(b + LayoutQ4_1::kD), m = load_f16(b + LayoutQ4_1::kM);
  for (int i = 0; i < 32; ++i) out[i] = PQ_FMUL(d, float(nibble32(b + LayoutQ4_1::kQs, i))) + m;
}

PQ_HD void dequant_block_q5_0(const uint8_t* b, float* out) {
  const float d = load_f16(b + LayoutQ5_0::kD);
  for (int i = 0; i < 32; ++i)
    out[i] = PQ_FMUL(d, float(q5_code(b + LayoutQ5_0::kQh, b + LayoutQ5_0::kQs, i) - 16));
}

PQ_HD void dequant_block_q5_1(const uint8_t* b, float* out) {
  const float d = load_f16(b + LayoutQ5_1::kD), m = load_f16(b + LayoutQ5_1::kM);
  for (int i = 0; i < 32; ++i)
    out[i] = PQ_FMUL(d, float(q5_code(b + LayoutQ5_1::kQh, b + LayoutQ5_1::kQs, i))) + m;
}

PQ_HD void dequant_block_q8_0(const uint8_t* b, float* out) {
  const float d = load_f16(b + LayoutQ8_0::kD);
  for (int i = 0; i < 32; ++i) out[i] = PQ_FMUL(float(static_cast<int8_t>(b[LayoutQ8_0::kQs + i])), d);
}

PQ_HD void dequant_block_q2_k(const uint8_t* b, float* out) {
  const float d = load_f16(b + LayoutQ2_K::kD), dmin = load_f16(b + LayoutQ2_K::kDmin);
  for (int j = 0; j < 16; ++j) {
    const int s = b[LayoutQ2_K::kScales + j];
    const float dl = PQ_FMUL(d, float(s & 0xF)), ml = PQ_FMUL(dmin, float(s >> 4));
    for (int i = j * 16; i < j * 16 + 16; ++i)
      out[i] = PQ_FMUL(dl, float(k_2bit(b + LayoutQ2_K::kQs, i))) - ml;
  }
}

PQ_HD void dequant_block_q3_k(const uint8_t* b, float* out) {
  const float d = load_f16(b + LayoutQ3_K::kD);
  for (int j = 0; j < 16; ++j) {
    const float dl = PQ_FMUL(d, float(q3k_scale(b + LayoutQ3_K::kScales, j)));
    for (int i = j * 16; i < j * 16 + 16; ++i) out[i] = PQ_FMUL(dl, float(q3k_code(b, i)));
  }
}

PQ_HD void dequant_block_q4_k(const uint8_t* b, float* out) {
  const float d = load_f16(b + LayoutQ4_K::kD), dmin = load_f16(b + LayoutQ4_K::kDmin);
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    k_scale_min(b + LayoutQ4_K::kScales, j, sc, m);
    const float dl = PQ_FMUL(d, float(sc)), ml = PQ_FMUL(dmin, float(m));
    for (int i = j * 32; i < j * 32 + 32; ++i) out[i] = PQ_FMUL(dl, float(q4k_code(b + LayoutQ4_K::kQs, i))) - ml;
  }
}

PQ_HD void dequant_block_q5_k(const uint8_t* b, float* out) {
  const float d = load_f16(b + LayoutQ5_K::kD), dmin = load_f16(b + LayoutQ5_K::kDmin);
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    k_scale_min(b + LayoutQ5_K::kScales, j, sc, m);
    const float dl = PQ_FMUL(d, float(sc)), ml = PQ_FMUL(dmin, float(m));
    for (int i = j * 32; i < j * 32 + 32; ++i)
      out[i] = PQ_FMUL(dl, float(q5k_code(b + LayoutQ5_K::kQh, b + LayoutQ5_K::kQs, i))) - ml;
  }
}

PQ_HD void dequant_block_q6_k(const uint8_t* b, float* out) {
  const float d = load_f16(b + LayoutQ6_K::kD);
  for (int j = 0; j < 16; ++j) {
    const float dl = PQ_FMUL(d, float(static_cast<int8_t>(b[LayoutQ6_K::kScales + j])));
    for (int i = j * 16; i < j * 16 + 16; ++i) out[i] = PQ_FMUL(dl, float(q6k_code(b, i)));
  }
}

// Any type; returns false for an unknown type code.
PQ_HD bool dequant_block(int type, const uint8_t* b, float* out) {
  switch (type) {
    case kQ4_0: dequant_block_q4_0(b, out); return true;
    case kQ4_1: dequant_block_q4_1(b, out); return true;
    case kQ5_0: dequant_block_q5_0(b, out); return true;
    case kQ5_1: dequant_block_q5_1(b, out); return true;
    case kQ8_0: dequant_block_q8_0(b, out); return true;
    case kQ2_K: dequant_block_q2_k(b, out); return true;
    case kQ3_K: dequant_block_q3_k(b, out); return true;
    case kQ4_K: dequant_block_q4_k(b, out); return true;
    case kQ5_K: dequant_block_q5_k(b, out); return true;
    case kQ6_K: dequant_block_q6_k(b, out); return true;
    default: return false;
  }
}

}  // namespace gguf
}  // namespace pyquant
