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
// 8-lane partial sums, reduced by hsum_avx2, then the len % 8 tail in order.
template <int MR, int NR>
PQ_TARGET_AVX2 void micro_gemm_avx2(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t len, float* y,
                                    int64_t ldy) {
  __m256 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * ldw + k);
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * ldx + k);
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NR; ++j) {
      float t = hsum_avx2(acc[r][j]);
      for (int64_t kk = k; kk < len; ++kk) t += x[r * ldx + kk] * w[j * ldw + kk];
      y[r * ldy + j] += t;
    }
  }
}

// The same at 16 lanes, for the avx512 level: twice the multiply rate of the
// ymm tile where a core has two 512-bit FMA units; Zen 4 splits zmm
// operations in two, so there it halves the instruction count. The len % 16
// tail in order.
template <int MR, int NR>
PQ_TARGET_AVX512 void micro_gemm_avx512(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t len,
                                        float* y, int64_t ldy) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= len; k += 16) {
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_ps(w + j * ldw + k);
    for (int r = 0; r < MR; ++r) {
      __m512 xv = _mm512_loadu_ps(x + r * ldx + k);
      // Held in a register: left alone, GCC folds this load into each of the
      // NR FMAs (NR loads of x per step instead of one; 7% slower here).
      __asm__("" : "+v"(xv));
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NR; ++j) {
      float t = _mm512_reduce_add_ps(acc[r][j]);
      for (int64_t kk = k; kk < len; ++kk) t += x[r * ldx + kk] * w[j * ldw + kk];
      y[r * ldy + j] += t;
    }
  }
}
#endif

// The kernel for an mr x nr tile (1 <= mr <= kMicroMR, 1 <= nr <= kMicroNR);
// avx512 implies avx2.
inline MicroGemmFn micro_gemm_fn(int mr, int nr, bool avx2, bool avx512 = false) {
#if PQ_X86
  if (avx512) {
    static const MicroGemmFn t[kMicroMR][kMicroNR] = {
        {micro_gemm_avx512<1, 1>, micro_gemm_avx512<1, 2>, micro_gemm_avx512<1, 3>},
        {micro_gemm_avx512<2, 1>, micro_gemm_avx512<2, 2>, micro_gemm_avx512<2, 3>},
        {micro_gemm_avx512<3, 1>, micro_gemm_avx512<3, 2>, micro_gemm_avx512<3, 3>},
        {micro_gemm_avx512<4, 1>, micro_gemm_avx512<4, 2>, micro_gemm_avx512<4, 3>},
    };
    return t[mr - 1][nr - 1];
  }
  if (avx2) {
    static const MicroGemmFn t[kMicroMR][kMicroNR] = {
        {micro_gemm_avx2<1, 1>, micro_gemm_avx2<1, 2>, micro_gemm_avx2<1, 3>},
        {micro_gemm_avx2<2, 1>, micro_gemm_avx2<2, 2>, micro_gemm_avx2<2, 3>},
        {micro_gemm_avx2<3, 1>, micro_gemm_avx2<3, 2>, micro_gemm_avx2<3, 3>},
        {micro_gemm_avx2<4, 1>, micro_gemm_avx2<4, 2>, micro_gemm_avx2<4, 3>},
    };
    return t[mr - 1][nr - 1];
  }
#endif
  static const MicroGemmFn t[kMicroMR][kMicroNR] = {
      {micro_gemm_scalar<1, 1>, micro_gemm_scalar<1, 2>, micro_gemm_scalar<1, 3>},
      {micro_gemm_scalar<2, 1>, micro_gemm_scalar<2, 2>, micro_gemm_scalar<2, 3>},
      {micro_gemm_scalar<3, 1>, micro_gemm_scalar<3, 2>, micro_gemm_scalar<3, 3>},
      {micro_gemm_scalar<4, 1>, micro_gemm_scalar<4, 2>, micro_gemm_scalar<4, 3>},
  };
  return t[mr - 1][nr - 1];
}

}  // namespace pyquant
