// Int format, M > kGemvPassMaxM: a tiled GEMM.
//
// Decoding costs the same for any M, so here it is done once per weight per
// call: a tile of kTileN weight rows x kBlockK columns is dequantized into an
// fp32 buffer that stays in L1, then a register-blocked micro-kernel runs
// every row of x against it: from kOuterTileMinM rows the outer-product tile
// of panel_gemm.h on x repacked once per call; below that, at the avx2 level
// kMR rows of x x kNR weight rows, 12 ymm accumulators vectorised along K so
// both operands are plain loads (the horizontal sums happen once per K
// block), at the avx512 level micro_gemm.h's 16-lane version of that tile.
// Threads take super-tiles of rows; a super-tile is swept once per K block,
// so its tiles share the x panel in L2, and the next tile's weight lines are
// prefetched in software (the rows are a stride apart, which the hardware
// prefetcher does not follow).
#include <omp.h>

#include <algorithm>

#include "avx2_reduce.h"
#include "int_kernels.h"
#include "micro_gemm.h"
#include "panel_gemm.h"

namespace pyquant {
namespace {

#if PQ_X86
constexpr int kMR = 4;          // rows of x per micro-kernel
constexpr int kNR = 3;          // weight rows per micro-kernel
// 12 x 512 fp32 (24 KiB) tile + a 4 x 512 x panel (8 KiB) fill the 32 KiB
// L1; a long K block keeps the horizontal sums at the end of the
// micro-kernel rare (measured best among 6..24 rows x 128..2048 columns).
constexpr int kTileN = 4 * kNR;  // weight rows decoded at once
constexpr int kBlockK = 512;     // columns per K block (a multiple of the chunk)
// A work item is a super-tile of up to kMaxSuperTiles tiles swept once per
// K block, so the x panel (M x kBlockK) is reused from L2 by all its tiles
// instead of streaming all of x from L3 once per tile (which capped 2-thread
// scaling at ~1.5x; 16 tiles measured best).
constexpr int64_t kMaxSuperTiles = 16;

// Sum of each of four vectors, as one vector: [sum a, sum b, sum c, sum d].
PQ_TARGET_AVX2 inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// y[i, j] += sum_k x[i, k] * wt[j, k] for MR rows of x and NR rows of the tile.
template <int MR, int NR>
PQ_TARGET_AVX2 void micro(const float* x, int64_t ldx, const float* wt, int64_t klen, float* y, int64_t ldy) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < klen; k += 8) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_load_ps(wt + j * kBlockK + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if constexpr (MR == 4) {
    for (int j = 0; j < NR; ++j) {
      alignas(16) float s[4];
      _mm_store_ps(s, hsum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]));
      for (int i = 0; i < 4; ++i) y[i * ldy + j] += s[i];
    }
  } else {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) y[i * ldy + j] += hsum_avx2(acc[i][j]);
  }
}

template <int MR>
PQ_TARGET_AVX2 void micro_nr(int nr, const float* x, int64_t ldx, const float* wt, int64_t klen, float* y,
                             int64_t ldy) {
  switch (nr) {
    case 1: return micro<MR, 1>(x, ldx, wt, klen, y, ldy);
    case 2: return micro<MR, 2>(x, ldx, wt, klen, y, ldy);
    default: return micro<MR, 3>(x, ldx, wt, klen, y, ldy);
  }
}

PQ_TARGET_AVX2 void micro_any(int mr, int nr, const float* x, int64_t ldx, const float* wt, int64_t klen, float* y,
                              int64_t ldy) {
  switch (mr) {
    case 1: return micro_nr<1>(nr, x, ldx, wt, klen, y, ldy);
    case 2: return micro_nr<2>(nr, x, ldx, wt, klen, y, ldy);
    case 3: return micro_nr<3>(nr, x, ldx, wt, klen, y, ldy);
    default: return micro_nr<4>(nr, x, ldx, wt, klen, y, ldy);
  }
}

// Dequantizes rows [n0, n0 + rows) x columns [k0, k0 + klen) into buf
// (row stride kBlockK); columns past K become 0.
template <int BITS>
PQ_TARGET_AVX2 void decode_tile(const IntWeight& w, int64_t n0, int rows, int64_t k0, int64_t klen, float* buf) {
  constexpr int cb = kIntChunk * BITS / 8;
  const int64_t cpg = w.chunks_per_group, rb = w.row_bytes;
  const int64_t cbeg = k0 / kIntChunk, cend = (k0 + klen) / kIntChunk;
  const int64_t gbeg = cbeg / cpg;
  for (int r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    const uint8_t* row = w.qweight + n * rb;
    float* dst = buf + r * kBlockK - k0;
    for (int64_t g = gbeg, c = cbeg; c < cend; ++g) {
      const __m256 s = _mm256_set1_ps(scale_avx2(w, n, g)), z = _mm256_set1_ps(zero_avx2(w, n, g));
      const int64_t gend = std::min((g + 1) * cpg, cend);
      for (; c < gend; ++c) {
        __m256i q[4];
        int_decode_chunk_avx2<BITS>(row + c * cb, q);
        for (int t = 0; t < 4; ++t) {
          _mm256_store_ps(dst + c * kIntChunk + 8 * t, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q[t]), z), s));
        }
      }
    }
    for (int64_t kk = std::max(w.k, k0); kk < k0 + klen; ++kk) dst[kk] = 0.0f;
  }
}

template <int BITS>
PQ_TARGET_AVX2 void prefetch_tile(const IntWeight& w, int64_t n0, int64_t n1, int64_t k0, int64_t klen) {
  const int64_t bytes = klen * BITS / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const char* p = reinterpret_cast<const char*>(w.qweight + n * w.row_bytes + k0 * BITS / 8);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
  }
}

// Rows [nb, ne) (one super-tile) of y += x @ W_hat.T.
template <int BITS>
PQ_TARGET_AVX2 void gemm_part(const float* x, int64_t ldx, int64_t m, const IntWeight& w, float* y, int64_t nb,
                              int64_t ne, bool wide, const PanelGemm* outer, const float* x_panels, float* yt,
                              int64_t ldyt) {
  alignas(64) float buf[kTileN * kBlockK];
  const int64_t kp = w.chunks * kIntChunk;
  for (int64_t k0 = 0; k0 < kp; k0 += kBlockK) {
    const int64_t klen = std::min<int64_t>(kBlockK, kp - k0);
    for (int64_t n0 = nb; n0 < ne; n0 += kTileN) {
      const int rows = int(std::min<int64_t>(kTileN, ne - n0));
      // Each tile reads a few cache lines per weight row, at a row stride the
      // hardware prefetcher does not follow: fetch the next tile's lines (or
      // the first tile's lines of the next K block) while this one computes.
      if (n0 + kTileN < ne) {
        prefetch_tile<BITS>(w, n0 + kTileN, std::min(ne, n0 + 2 * kTileN), k0, klen);
      } else if (k0 + kBlockK < kp) {
        prefetch_tile<BITS>(w, nb, std::min(ne, nb + kTileN), k0 + kBlockK, std::min<int64_t>(kBlockK, kp - k0 - kBlockK));
      }
      decode_tile<BITS>(w, n0, rows, k0, klen, buf);
      if (outer) {
        outer->gemm(x_panels, m, kp, k0, klen, buf, kBlockK, rows, yt + (n0 - nb) * ldyt, ldyt);
        continue;
      }
      for (int64_t i0 = 0; i0 < m; i0 += kMR) {
        const int mr = int(std::min<int64_t>(kMR, m - i0));
        for (int j0 = 0; j0 < rows; j0 += kNR) {
          const int nr = std::min(kNR, rows - j0);
          if (wide) {
            micro_gemm_fn(mr, nr, true, true)(x + i0 * ldx + k0, ldx, buf + j0 * kBlockK, kBlockK, klen,
                                              y + i0 * w.n + n0 + j0, w.n);
          } else {
            micro_any(mr, nr, x + i0 * ldx + k0, ldx, buf + j0 * kBlockK, klen, y + i0 * w.n + n0 + j0, w.n);
          }
        }
      }
    }
  }
}

// Tiles are handed out dynamically: on a shared machine a thread that loses
// its core for a while then holds up only the tile it is on.
template <int BITS>
void gemm(const float* x, int64_t ldx, int64_t m, const IntWeight& w, const float* bias, const LoraEpilogue& lora,
          float* y, int nthreads) {
  // Super-tiles as large as measured best, but at least ~4 per thread so
  // that the dynamic hand-out can balance the load.
  const int64_t tiles = (w.n + kTileN - 1) / kTileN;
  const int64_t per = std::max<int64_t>(1, std::min(kMaxSuperTiles, tiles / (4 * std::max(nthreads, 1))));
  const int64_t super_rows = per * kTileN, items = (w.n + super_rows - 1) / super_rows;
  // From kOuterTileMinM rows x is repacked for the outer-product tile
  // (panel_gemm.h; the packing is O(m k) against the GEMM's O(m n k)), and
  // each thread sums a super-tile's outputs transposed, added to y once;
  // below that the dot-product tile (16 lanes at the avx512 level).
  const Simd level = simd_level();  // read outside the region: it may throw
  const bool wide = level >= Simd::kAvx512;
  const PanelGemm* outer = panel_gemm_for(level, m);
  float *x_panels = nullptr, *yt_all = nullptr;
  const int64_t ldyt = padded_rows(m);
  if (outer) {
    const int64_t kp = w.chunks * kIntChunk;
    x_panels = thread_scratch(x_panels_floats(m, kp), Scratch::kXPanels);
    yt_all = thread_scratch(nthreads * super_rows * ldyt, Scratch::kYTransposed);
    pack_x_panels(x, ldx, m, w.k, kp, x_panels, nthreads);
  }
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t t = 0; t < items; ++t) {
    const int64_t nb = t * super_rows, ne = std::min(w.n, nb + super_rows);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t n = nb; n < ne; ++n) y[i * w.n + n] = bias ? bias[n] : 0.0f;
    float* yt = outer ? yt_all + omp_get_thread_num() * super_rows * ldyt : nullptr;
    if (yt) std::fill(yt, yt + (ne - nb) * ldyt, 0.0f);
    gemm_part<BITS>(x, ldx, m, w, y, nb, ne, wide, outer, x_panels, yt, ldyt);
    if (yt) outer->add_transposed(yt, ldyt, int(ne - nb), m, y + nb, w.n);
    lora.apply(y, w.n, 0, m, nb, ne);
  }
}
#endif

}  // namespace

void int_gemm_avx2(const float* x, int64_t ldx, int64_t m, const IntWeight& w, const float* bias,
                   const LoraEpilogue& lora, float* y, int nthreads) {
#if PQ_X86
  PQ_BITS_SWITCH(w.bits, kBits, "int_gemm_avx2", [&] { gemm<kBits>(x, ldx, m, w, bias, lora, y, nthreads); });
#endif
}

}  // namespace pyquant
