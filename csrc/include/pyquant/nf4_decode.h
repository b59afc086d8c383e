// NF4 (bitsandbytes' QLoRA format, see pyquant/formats/nf4.py and
// pyquant/ops/reference_nf4.py): codebook and per-value decode shared by the
// CPU kernels and (later) CUDA. Scalar on purpose; SIMD kernels are tested
// against these.
//
// Flat row-major index i of an (N, K) weight: code = nibble i of qweight (even
// i: high nibble of byte i/2, odd i: low nibble), value = kNf4Codebook[code] *
// absmax[i / block_size], a single fp32 multiply.
#pragma once
#include "pyquant/common.h"

namespace pyquant {

constexpr int kNf4NestedBlock = 256;  // absmax values per double-quant scale

#define PQ_NF4_CODEBOOK_VALUES                                                                    \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                      \
   -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,                     \
   0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,        \
   0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f}

constexpr float kNf4Codebook[16] = PQ_NF4_CODEBOOK_VALUES;
#if defined(__CUDACC__)
// Device code cannot index a host constexpr array at run time; each
// translation unit gets its own copy in constant memory.
static __constant__ float kNf4CodebookDevice[16] = PQ_NF4_CODEBOOK_VALUES;
#endif

PQ_HD float nf4_value(uint32_t code) {
#if defined(__CUDA_ARCH__)
  return kNf4CodebookDevice[code & 15u];
#else
  return kNf4Codebook[code & 15u];
#endif
}

// 4-bit code of flat element i.
PQ_HD uint32_t nf4_code(const uint8_t* qweight, int64_t i) {
  const uint32_t byte = qweight[i >> 1];
  return (i & 1) ? (byte & 15u) : (byte >> 4);
}

// round(round(a * b) + c) in fp32, never contracted into an FMA: double
// quantization must reproduce bitsandbytes, which multiplies and adds in two
// separate passes. GCC contracts a*b+c across statements by default
// (-ffp-contract=fast) wherever FMA is enabled, so the product is pinned in a
// register through an empty asm the optimiser cannot see through.
PQ_HD float mul_add_unfused(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(a, b), c);
#else
  float p = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(p));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(p));
#else
  volatile float pv = p;
  p = pv;
#endif
  return p + c;
#endif
}

// Per-block scale, plain or double-quantized:
//   absmax[b] = dyn_map[absmax_q[b]] * absmax_scale[b / 256] + offset.
struct Nf4Scales {
  const float* absmax;        // plain fp32 absmax, or nullptr with double quantization
  const uint8_t* absmax_q;    // double quantization: 8-bit codes
  const float* absmax_scale;  // one per 256 blocks
  const float* dyn_map;       // 256-entry signed dynamic map
  float offset;

  PQ_HD float operator()(int64_t b) const {
    if (absmax) return absmax[b];
    return mul_add_unfused(dyn_map[absmax_q[b]], absmax_scale[b / kNf4NestedBlock], offset);
  }
};

// Scalar decode of flat element i.
PQ_HD float nf4_decode(const uint8_t* qweight, const Nf4Scales& scales, int64_t block_size, int64_t i) {
  return nf4_value(nf4_code(qweight, i)) * scales(i / block_size);
}

}  // namespace pyquant
