// Force-included (-include) into every file of the emulated build only:
// cmake -DPYQUANT_SIMDE_INCLUDE=<SIMDe checkout> (setup.py: PYQUANT_SIMDE_INCLUDE).
//
// Why it exists: the avxvnni and avx512 kernels are compiled everywhere but run
// only on CPUs that have those instructions, so on an AVX2-only machine their
// tests skip and a fault in them goes unseen (one did: 04ef1fe). This
// build compiles the same kernel source with SIMDe's portable versions of the
// AVX-512 / AVX-VNNI intrinsics (two 256-bit halves each, on top of native
// AVX2), and simd.cpp reports every level as present, so every level's tests
// run here and compare against the reference. The results test the index
// arithmetic, masks and tails of the wide kernels; the emulated build is slow
// and its timings mean nothing. Never ship it: the module says so
// (`pyquant._C.simd_emulated()`, `pyquant.env()['cpu_simd_emulated']`).
#pragma once
#ifndef __cplusplus
#error "simd_emulation.h is for the C++ sources"
#endif
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "the emulated build compiles every file with -mavx2 -mfma -mf16c (CMakeLists.txt)"
#endif
#define PQ_EMULATE_WIDE_SIMD 1

#include <immintrin.h>
#include <cstdint>
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

// AVX-VNNI's VEX forms compute what the 256-bit AVX512-VNNI forms compute.
#define _mm256_dpbusd_avx_epi32(acc, a, b) simde_mm256_dpbusd_epi32(acc, a, b)
#define _mm256_dpwssd_avx_epi32(acc, a, b) simde_mm256_dpwssd_epi32(acc, a, b)

// The two 512-bit gathers the kernels use, which SIMDe lacks: lane by lane,
// same operands as the intrinsics, and masked-off lanes are not read.
#undef _mm512_i32gather_epi32
#define _mm512_i32gather_epi32(idx, base, scale) pq_emu_i32gather_epi32(idx, base, scale)
#undef _mm512_mask_i32gather_ps
#define _mm512_mask_i32gather_ps(src, k, idx, base, scale) pq_emu_mask_i32gather_ps(src, k, idx, base, scale)

// Nor has SIMDe the zero-extending 256 -> 512-bit cast (legacy_pair's fma_into).
#undef _mm512_zextps256_ps512
#define _mm512_zextps256_ps512(a) simde_mm512_insertf32x8(simde_mm512_setzero_ps(), (a), 0)

// SIMDe's masked loads read the whole vector and its masked stores write it
// back: a read past the tensor (which the native instructions never make;
// tests/ops/test_cpu_reads_in_bounds.py fences tensors with unreadable pages)
// and a store over lanes another thread owns. These touch only the lanes the
// mask selects, as the instructions do.
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps(k, p) pq_emu_maskz_loadu<simde__m512, simde__m512_private, float>(k, p, 16)
#undef _mm512_maskz_loadu_epi8
#define _mm512_maskz_loadu_epi8(k, p) pq_emu_maskz_loadu<simde__m512i, simde__m512i_private, int8_t>(k, p, 64)
#undef _mm512_maskz_loadu_epi16
#define _mm512_maskz_loadu_epi16(k, p) pq_emu_maskz_loadu<simde__m512i, simde__m512i_private, int16_t>(k, p, 32)
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16(k, p) pq_emu_maskz_loadu<simde__m256i, simde__m256i_private, int16_t>(k, p, 16)
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps(p, k, v) pq_emu_mask_storeu_ps(p, k, v)

template <typename Vec, typename Private, typename Lane>
static inline Vec pq_emu_maskz_loadu(unsigned long long k, const void* p, int lanes) {
  Private r;
  __builtin_memset(&r, 0, sizeof(r));
  Lane* out = reinterpret_cast<Lane*>(&r);
  for (int l = 0; l < lanes; ++l)
    if ((k >> l) & 1) __builtin_memcpy(out + l, static_cast<const Lane*>(p) + l, sizeof(Lane));
  Vec v;
  __builtin_memcpy(&v, &r, sizeof(v));
  return v;
}

static inline void pq_emu_mask_storeu_ps(void* p, simde__mmask16 k, simde__m512 v) {
  const simde__m512_private a = simde__m512_to_private(v);
  for (int l = 0; l < 16; ++l)
    if ((k >> l) & 1) __builtin_memcpy(static_cast<float*>(p) + l, &a.f32[l], 4);
}

static inline simde__m512i pq_emu_i32gather_epi32(simde__m512i idx, const void* base, int scale) {
  const simde__m512i_private i = simde__m512i_to_private(idx);
  simde__m512i_private r;
  for (int l = 0; l < 16; ++l) {
    const char* p = static_cast<const char*>(base) + static_cast<long long>(i.i32[l]) * scale;
    __builtin_memcpy(&r.i32[l], p, 4);
  }
  return simde__m512i_from_private(r);
}

static inline simde__m512 pq_emu_mask_i32gather_ps(simde__m512 src, simde__mmask16 k, simde__m512i idx,
                                                   const void* base, int scale) {
  const simde__m512i_private i = simde__m512i_to_private(idx);
  simde__m512_private r = simde__m512_to_private(src);
  for (int l = 0; l < 16; ++l) {
    if (!((k >> l) & 1)) continue;  // masked lanes are not read: they may lie past the tensor
    const char* p = static_cast<const char*>(base) + static_cast<long long>(i.i32[l]) * scale;
    __builtin_memcpy(&r.f32[l], p, 4);
  }
  return simde__m512_from_private(r);
}
