// The "transposed" quantized matmul shared by the Int and NF4 families:
// out (M, K) fp32 = g (M, N) fp32 @ W_hat (N, K), reduced over N, the product
// the backward of y = x @ W_hat.T needs for grad_x. The weight is never
// materialised: each work item owns kTransposedCols columns of out for up to
// kTransposedRows rows of g, keeps their sums in an L1-resident buffer, and
// walks the N weight rows once, decoding only its column segment of each row
// (a contiguous run of packed bytes) and adding g[i, n] * row into every sum
// (an axpy: vectorised along K, so no horizontal sums are needed). For more
// rows of g than one such pass, a tiled GEMM (below) takes over.
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
#include "thread_scratch.h"

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

// ---- The tiled form, for more rows of g than one streaming pass ------------
// The streaming kernel reads the weight once per kTransposedRows rows of g;
// from the second pass on, decoding it once per block of kTgBlockM rows into
// tiles and running a register-blocked GEMM on them is faster (one thread,
// 4096 x 4096 Int4 g64: streaming 4.7 ms at M = 7 and 11.3 at 16, tiled 5.5
// at 8 and 7.5 at 16; at M = 256 to 2048 the tiled form runs at 1.8-2.3x
// torch.mm(g, W_hat) on the dequantized weight with zmm strips, 0.97-1.24x
// with ymm ones). A work item owns kTgCols columns
// of out for one block of rows; it walks N in steps of kTgRows weight rows,
// decodes those rows' column segments into a tile (kTgRows x kTgCols fp32, 96
// KiB, stored as column strips of 24, or 48 at the avx512 level), and adds
// g[:, step] @ tile into an accumulator (block rows x kTgCols, in L2) with an
// outer-product micro-kernel: 4 rows of g x one strip = 12 vector sums, each
// step one broadcast of g per row and 3 loads of the strip for 12 FMAs, no
// horizontal sums. Every row group of g runs against one strip (24 or 48 KiB,
// in L1 or L2) before the next strip.
constexpr int64_t kTransposedGemmMinM = kTransposedRows + 1;
constexpr int64_t kTgCols = 96;    // a multiple of the strips (24, 48), of Int's 32-code chunk and NF4's 16
constexpr int64_t kTgRows = 256;   // weight rows per decoded tile
constexpr int64_t kTgBlockM = 256;  // rows of g per work item (its accumulator: 96 KiB)
constexpr int kTgMR = 4;  // rows of g per micro-kernel call

#if PQ_X86
// a[r][c] += sum_{u < len} g[r][u] * strip[u * STRIP + c] for the 4 rows r and
// the strip's STRIP columns c: 3 vectors of 8 (ymm) or of 16 (zmm, the avx512
// level: twice the multiply rate where a core has two 512-bit FMA units).
// Named accumulators: with an array of them GCC stored all 12 to the stack on
// every step (half speed).
#define PQ_TG_MICRO(NAME, TARGET, VEC, W, LOAD, LOADU, STOREU, BCAST, FMA)                                    \
  TARGET inline void NAME(const float* const g[kTgMR], const float* w, int64_t len, float* const a[kTgMR]) {   \
    const float *g0 = g[0], *g1 = g[1], *g2 = g[2], *g3 = g[3];                                              \
    VEC c00 = LOADU(a[0]), c01 = LOADU(a[0] + W), c02 = LOADU(a[0] + 2 * W);                                \
    VEC c10 = LOADU(a[1]), c11 = LOADU(a[1] + W), c12 = LOADU(a[1] + 2 * W);                                \
    VEC c20 = LOADU(a[2]), c21 = LOADU(a[2] + W), c22 = LOADU(a[2] + 2 * W);                                \
    VEC c30 = LOADU(a[3]), c31 = LOADU(a[3] + W), c32 = LOADU(a[3] + 2 * W);                                \
    for (int64_t u = 0; u < len; ++u, w += 3 * W) {                                                          \
      const VEC w0 = LOAD(w), w1 = LOAD(w + W), w2 = LOAD(w + 2 * W);                                         \
      VEC b = BCAST(g0[u]);                                                                                   \
      c00 = FMA(b, w0, c00), c01 = FMA(b, w1, c01), c02 = FMA(b, w2, c02);                                    \
      b = BCAST(g1[u]);                                                                                       \
      c10 = FMA(b, w0, c10), c11 = FMA(b, w1, c11), c12 = FMA(b, w2, c12);                                    \
      b = BCAST(g2[u]);                                                                                       \
      c20 = FMA(b, w0, c20), c21 = FMA(b, w1, c21), c22 = FMA(b, w2, c22);                                    \
      b = BCAST(g3[u]);                                                                                       \
      c30 = FMA(b, w0, c30), c31 = FMA(b, w1, c31), c32 = FMA(b, w2, c32);                                    \
    }                                                                                                         \
    STOREU(a[0], c00), STOREU(a[0] + W, c01), STOREU(a[0] + 2 * W, c02);                                      \
    STOREU(a[1], c10), STOREU(a[1] + W, c11), STOREU(a[1] + 2 * W, c12);                                      \
    STOREU(a[2], c20), STOREU(a[2] + W, c21), STOREU(a[2] + 2 * W, c22);                                      \
    STOREU(a[3], c30), STOREU(a[3] + W, c31), STOREU(a[3] + 2 * W, c32);                                      \
  }
PQ_TG_MICRO(tg_micro256, PQ_TARGET_AVX2, __m256, 8, _mm256_load_ps, _mm256_loadu_ps, _mm256_storeu_ps,
            _mm256_set1_ps, _mm256_fmadd_ps)
PQ_TG_MICRO(tg_micro512, PQ_TARGET_AVX512, __m512, 16, _mm512_load_ps, _mm512_loadu_ps, _mm512_storeu_ps,
            _mm512_set1_ps, _mm512_fmadd_ps)
#undef PQ_TG_MICRO

// STRIP: columns per micro-kernel call, 24 (ymm) or 48 (zmm); kTgCols holds
// a whole number of either.
template <int64_t STRIP, class Decode>
void transposed_gemm(const float* g, int64_t m, int64_t n, int64_t k, const Decode& decode, float* out,
                     int nthreads) {
  static_assert(kTgCols % STRIP == 0, "a tile is a whole number of strips");
  constexpr auto micro = STRIP == 48 ? tg_micro512 : tg_micro256;
  const int64_t col_items = (k + kTgCols - 1) / kTgCols;
  const int64_t items = col_items * ((m + kTgBlockM - 1) / kTgBlockM);
  // Each thread's tile and accumulator (192 KiB: too much for an OpenMP
  // thread's stack), taken here: an exception must not escape the region.
  // + one decoded row segment, zeros standing in for the missing rows of a
  // short last row group of g, and a sink for their sums.
  // Rounded to 16 floats, so every thread's block starts on a cache line.
  constexpr int64_t kPer = ((kTgRows + kTgBlockM + 1) * kTgCols + kTgRows + STRIP + 15) / 16 * 16;
  const int threads = std::max(nthreads, 1);
  float* base = thread_scratch(kPer * threads, Scratch::kTransposedTiles);
#pragma omp parallel num_threads(threads) if (items > 1)
  {
    float* tile = base + kPer * omp_get_thread_num();  // 64-byte aligned
    float* acc = tile + kTgRows * kTgCols;
    float* row = acc + kTgBlockM * kTgCols;
    float* zeros = row + kTgCols;
    float* sink = zeros + kTgRows;
    std::fill(zeros, zeros + kTgRows, 0.0f);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < items; ++t) {
      const int64_t k0 = (t % col_items) * kTgCols, k1 = std::min(k, k0 + kTgCols), len = k1 - k0;
      const int64_t m0 = (t / col_items) * kTgBlockM;
      const int64_t rows = std::min(kTgBlockM, m - m0);
      std::fill(acc, acc + rows * kTgCols, 0.0f);
      for (int64_t r0 = 0; r0 < n; r0 += kTgRows) {
        const int64_t nr = std::min(kTgRows, n - r0);
        for (int64_t u = 0; u < nr; ++u) {
          decode(r0 + u, k0, k1, row);
          // Columns past K: zeros, so the micro-kernel runs whole vectors.
          if (len < kTgCols) std::fill(row + len, row + kTgCols, 0.0f);
          for (int64_t c = 0; c < kTgCols; c += STRIP)
            memcpy(tile + c * kTgRows + u * STRIP, row + c, sizeof(float) * STRIP);
        }
        for (int64_t c = 0; c < len; c += STRIP) {
          for (int64_t i = 0; i < rows; i += kTgMR) {
            const float* gr[kTgMR];
            float* ar[kTgMR];
            for (int r = 0; r < kTgMR; ++r) {
              const bool real = i + r < rows;
              gr[r] = real ? g + (m0 + i + r) * n + r0 : zeros;
              ar[r] = real ? acc + (i + r) * kTgCols + c : sink;
            }
            micro(gr, tile + c * kTgRows, nr, ar);
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) memcpy(out + (m0 + i) * k + k0, acc + i * kTgCols, sizeof(float) * len);
    }
  }
}
#endif

template <class Decode>
void transposed_matmul(const float* g, int64_t m, int64_t n, int64_t k, const Decode& decode, float* out,
                       int nthreads, bool avx2) {
  if (m <= 0 || k <= 0) return;
#if PQ_X86
  if (avx2 && m >= kTransposedGemmMinM) {
    if (simd_level() >= Simd::kAvx512) return transposed_gemm<48>(g, m, n, k, decode, out, nthreads);
    return transposed_gemm<24>(g, m, n, k, decode, out, nthreads);
  }
#endif
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
