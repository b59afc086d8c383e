// The register-tile kernel of the CPU matmuls that decode a weight tile into
// an fp32 buffer first (GGUF and NF4 tiled paths; at the avx512 level only
// below kOuterTileMinM rows of x, see panel_gemm.h): y[r * ldy + j] +=
// dot(x row r, w row j) over len values, for r < MR rows of x and j < NR
// decoded weight rows, both row-major (strides ldx, ldw).
//
// kMicroMR x kMicroNR = 4 x 3 keeps 12 accumulators + 3 weight vectors + 1 x
// vector in the 16 ymm registers: each x load feeds 3 FMAs and each weight
// load 4 (measured best on K = N = 4096, one core). Both versions sum each
// dot product in a fixed order, so results do not depend on the caller.
#pragma once
#include <cstdint>

#include "avx2_reduce.h"
#include "simd.h"

#if PQ_X86
#include <immintrin.h>
#endif

namespace pyquant {

constexpr int kMicroMR = 4;  // rows of x per register tile
constexpr int kMicroNR = 3;  // weight rows per register tile

using MicroGemmFn = void (*)(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t len, float* y,
                             int64_t ldy);

template <int MR, int NR>
void micro_gemm_scalar(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t len, float* y,
                       int64_t ldy) {
  float acc[MR][NR] = {};
  for (int64_t k = 0; k < len; ++k) {
    for (int r = 0; r < MR; ++r) {
      const float xv = x[r * ldx + k];
      for (int j = 0; j < NR; ++j) acc[r][j] += xv * w[j * ldw + k];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) y[r * ldy + j] += acc[r][j];
}

#if PQ_X86
// VEC-wide partial sums (W lanes), reduced by HSUM, then the len % W tail in
// order: micro_gemm_avx2 (ymm) and micro_gemm_avx512 (zmm: twice the multiply
// rate of the ymm tile where a core has two 512-bit FMA units; Zen 4 splits
// zmm operations in two, so there it halves the instruction count). HOLD(xv)
// keeps the zmm tile's x vector in a register: left alone, GCC folds that
// load into each of the NR FMAs (NR loads of x per step instead of one; 7%
// slower there).
#define PQ_MICRO_GEMM_DOT(NAME, TARGET, VEC, W, ZERO, LOADU, FMA, HSUM, HOLD)                                    \
  template <int MR, int NR>                                                                                    \
  TARGET void NAME(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t len, float* y, int64_t ldy) { \
    VEC acc[MR][NR];                                                                                           \
    for (int r = 0; r < MR; ++r)                                                                               \
      for (int j = 0; j < NR; ++j) acc[r][j] = ZERO();                                                         \
    int64_t k = 0;                                                                                             \
    for (; k + W <= len; k += W) {                                                                             \
      VEC wv[NR];                                                                                              \
      for (int j = 0; j < NR; ++j) wv[j] = LOADU(w + j * ldw + k);                                             \
      for (int r = 0; r < MR; ++r) {                                                                           \
        VEC xv = LOADU(x + r * ldx + k);                                                                       \
        HOLD(xv);                                                                                              \
        for (int j = 0; j < NR; ++j) acc[r][j] = FMA(xv, wv[j], acc[r][j]);                                    \
      }                                                                                                        \
    }                                                                                                          \
    for (int r = 0; r < MR; ++r) {                                                                             \
      for (int j = 0; j < NR; ++j) {                                                                           \
        float t = HSUM(acc[r][j]);                                                                             \
        for (int64_t kk = k; kk < len; ++kk) t += x[r * ldx + kk] * w[j * ldw + kk];                           \
        y[r * ldy + j] += t;                                                                                   \
      }                                                                                                        \
    }                                                                                                          \
  }
#define PQ_MICRO_NO_HOLD(v) (void)0
#if defined(PQ_EMULATE_WIDE_SIMD)
#define PQ_MICRO_HOLD(v) (void)0  // SIMDe's __m512 is two ymm registers: no "v" operand holds it
#else
#define PQ_MICRO_HOLD(v) __asm__("" : "+v"(v))
#endif
PQ_MICRO_GEMM_DOT(micro_gemm_avx2, PQ_TARGET_AVX2, __m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps,
                  hsum_avx2, PQ_MICRO_NO_HOLD)
PQ_MICRO_GEMM_DOT(micro_gemm_avx512, PQ_TARGET_AVX512, __m512, 16, _mm512_setzero_ps, _mm512_loadu_ps,
                  _mm512_fmadd_ps, _mm512_reduce_add_ps, PQ_MICRO_HOLD)
#undef PQ_MICRO_GEMM_DOT
#undef PQ_MICRO_NO_HOLD
#undef PQ_MICRO_HOLD
#endif

// The kernel for an mr x nr tile (1 <= mr <= kMicroMR, 1 <= nr <= kMicroNR);
// avx512 implies avx2.
// Every mr x nr instance of a tile template, indexed [mr - 1][nr - 1].
#define PQ_MICRO_TABLE(F)                                                         \
  {                                                                               \
    {F<1, 1>, F<1, 2>, F<1, 3>}, {F<2, 1>, F<2, 2>, F<2, 3>}, {F<3, 1>, F<3, 2>, F<3, 3>}, \
        {F<4, 1>, F<4, 2>, F<4, 3>}                                               \
  }
inline MicroGemmFn micro_gemm_fn(int mr, int nr, bool avx2, bool avx512 = false) {
#if PQ_X86
  if (avx512) {
    static const MicroGemmFn t[kMicroMR][kMicroNR] = PQ_MICRO_TABLE(micro_gemm_avx512);
    return t[mr - 1][nr - 1];
  }
  if (avx2) {
    static const MicroGemmFn t[kMicroMR][kMicroNR] = PQ_MICRO_TABLE(micro_gemm_avx2);
    return t[mr - 1][nr - 1];
  }
#endif
  static const MicroGemmFn t[kMicroMR][kMicroNR] = PQ_MICRO_TABLE(micro_gemm_scalar);
  return t[mr - 1][nr - 1];
}
#undef PQ_MICRO_TABLE

}  // namespace pyquant
