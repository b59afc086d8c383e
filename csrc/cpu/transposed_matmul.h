// The "transposed" quantized matmul shared by the Int and NF4 families:
// out (M, K) fp32 = g (M, N) fp32 @ W_hat (N, K), reduced over N, the product
// the backward of y = x @ W_hat.T needs for grad_x. The weight is never
// materialised: each work item owns kTransposedCols columns of out for up to
// kTransposedRows rows of g, keeps their sums in an L1-resident buffer, and
// walks the N weight rows once, decoding only its column segment of each row
// (a contiguous run of packed bytes) and adding g[i, n] * row into every sum
// (an axpy: vectorised along K, so no horizontal sums are needed).
//
// A family supplies `decode(row, k0, k1, dst)`: the fp32 values of columns
// [k0, k1) of one weight row, exactly as the format's decode gives them. It is
// called inside an OpenMP region and must not throw.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "simd.h"

#if PQ_X86
#include <immintrin.h>
#endif

namespace pyquant {

// 8 rows of g x 256 columns of fp32 sums (8 KiB) + four decoded row
// segments (4 KiB) stay in L1 next to the stream of packed weight bytes. 256
// columns are a whole number of Int chunks (32) and of NF4 bytes, and give
// K / 256 work items per row block (16 for K = 4096: enough to balance two
// threads). Four weight rows are added per pass over the sums, so each load
// and store of a sum carries four FMAs (one per row measured ~2x slower:
// the sums' loads and stores were the bottleneck).
constexpr int64_t kTransposedCols = 256;
constexpr int64_t kTransposedRows = 8;
constexpr int kTransposedUnroll = 4;

// acc[i * ldacc + j] += sum_u g[i * ldg + u] * w[u * ldw + j] for i < rows,
// u < kTransposedUnroll, j < len.
inline void axpy4_scalar(const float* g, int64_t ldg, int rows, const float* w, int64_t ldw, int64_t len,
                         float* acc, int64_t ldacc) {
  for (int i = 0; i < rows; ++i) {
    const float* a = g + i * ldg;
    float* out = acc + i * ldacc;
    for (int64_t j = 0; j < len; ++j) {
      out[j] += a[0] * w[j] + a[1] * w[ldw + j] + a[2] * w[2 * ldw + j] + a[3] * w[3 * ldw + j];
    }
  }
}

#if PQ_X86
PQ_TARGET_AVX2 inline void axpy4_avx2(const float* g, int64_t ldg, int rows, const float* w, int64_t ldw,
                                      int64_t len, float* acc, int64_t ldacc) {
  for (int i = 0; i < rows; ++i) {
    const float* a = g + i * ldg;
    const __m256 a0 = _mm256_set1_ps(a[0]), a1 = _mm256_set1_ps(a[1]), a2 = _mm256_set1_ps(a[2]),
                 a3 = _mm256_set1_ps(a[3]);
    float* out = acc + i * ldacc;
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
      __m256 v = _mm256_loadu_ps(out + j);
      v = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w + j), v);
      v = _mm256_fmadd_ps(a1, _mm256_loadu_ps(w + ldw + j), v);
      v = _mm256_fmadd_ps(a2, _mm256_loadu_ps(w + 2 * ldw + j), v);
      v = _mm256_fmadd_ps(a3, _mm256_loadu_ps(w + 3 * ldw + j), v);
      _mm256_storeu_ps(out + j, v);
    }
    for (; j < len; ++j) out[j] += a[0] * w[j] + a[1] * w[ldw + j] + a[2] * w[2 * ldw + j] + a[3] * w[3 * ldw + j];
  }
}
#endif

template <class Decode>
void transposed_matmul(const float* g, int64_t m, int64_t n, int64_t k, const Decode& decode, float* out,
                       int nthreads, bool avx2) {
  if (m <= 0 || k <= 0) return;
  constexpr int U = kTransposedUnroll;
  const int64_t col_items = (k + kTransposedCols - 1) / kTransposedCols;
  const int64_t items = col_items * ((m + kTransposedRows - 1) / kTransposedRows);
  // Handed out dynamically: on a shared machine a thread that loses its core
  // holds up only the item it is on.
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (items > 1)
  for (int64_t t = 0; t < items; ++t) {
    alignas(64) float wseg[U * kTransposedCols];
    alignas(64) float acc[kTransposedRows * kTransposedCols];
    alignas(16) float gblk[kTransposedRows * U];  // g[m0 + i, r0 + u]
    const int64_t k0 = (t % col_items) * kTransposedCols, k1 = std::min(k, k0 + kTransposedCols);
    const int64_t m0 = (t / col_items) * kTransposedRows;
    const int rows = int(std::min(kTransposedRows, m - m0));
    const int64_t len = k1 - k0;
    std::fill(acc, acc + rows * kTransposedCols, 0.0f);
    for (int64_t r0 = 0; r0 < n; r0 += U) {
      const int nr = int(std::min<int64_t>(U, n - r0));
      for (int u = 0; u < nr; ++u) decode(r0 + u, k0, k1, wseg + u * kTransposedCols);
      // A short last group: zero weights and coefficients (0 * 0 adds nothing).
      if (nr < U) std::fill(wseg + nr * kTransposedCols, wseg + U * kTransposedCols, 0.0f);
      for (int i = 0; i < rows; ++i)
        for (int u = 0; u < U; ++u) gblk[i * U + u] = u < nr ? g[(m0 + i) * n + r0 + u] : 0.0f;
#if PQ_X86
      if (avx2) {
        axpy4_avx2(gblk, U, rows, wseg, kTransposedCols, len, acc, kTransposedCols);
        continue;
      }
#endif
      axpy4_scalar(gblk, U, rows, wseg, kTransposedCols, len, acc, kTransposedCols);
    }
    for (int i = 0; i < rows; ++i) memcpy(out + (m0 + i) * k + k0, acc + i * kTransposedCols, sizeof(float) * len);
  }
}

// out (N, k1 - k0) fp32, row-major: columns [k0, k1) of every weight row, the
// panel a GEMM library multiplies when M is large enough to be compute-bound.
template <class Decode>
void decode_panel(int64_t n, int64_t k0, int64_t k1, const Decode& decode, float* out, int nthreads) {
  const int64_t width = k1 - k0;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n * width >= (int64_t(1) << 15))
  for (int64_t r = 0; r < n; ++r) decode(r, k0, k1, out + r * width);
}

}  // namespace pyquant
