#include "panel_gemm.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <stdexcept>
#include <utility>
#include <vector>

#include "simd.h"

#if PQ_X86
#include <immintrin.h>
#endif

namespace pyquant {

#if PQ_X86
namespace {

// v[j][i] <- v[i][j] for an 8 x 8 block of floats.
PQ_TARGET_AVX2 inline void transpose8x8(__m256 v[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    v[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// A column of a panel is 16 rows of x a stride apart: one masked gather per
// 16 values (rows past m read nothing and give 0), one aligned store.
PQ_TARGET_AVX512 void pack_piece(const float* x, int64_t ldx, int64_t m, int64_t k_valid, int64_t p0, int width,
                                 int64_t c0, int64_t c1, int64_t k, float* panels) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(int32_t(ldx)));
  float* dst = panels + p0 * k;
  for (int v = 0; v < width / 16; ++v) {
    const int64_t r0 = p0 + 16 * v;
    const int64_t live = std::clamp<int64_t>(m - r0, 0, 16);
    const __mmask16 rows = __mmask16((uint32_t(1) << live) - 1);
    const float* base = x + r0 * ldx;
    for (int64_t c = c0; c < c1; ++c) {
      const __m512 col = c < k_valid ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), rows, idx, base + c, 4)
                                     : _mm512_setzero_ps();
      _mm512_store_ps(dst + c * width + 16 * v, col);
    }
  }
}

// The same panels at the avx2 level (no masked gathers there): 8 x 8 blocks
// of x, read as rows and transposed in registers into 8 columns of half a
// 16-row vector.
PQ_TARGET_AVX2 void pack_piece_avx2(const float* x, int64_t ldx, int64_t m, int64_t k_valid, int64_t p0, int width,
                                    int64_t c0, int64_t c1, int64_t k, float* panels) {
  float* dst = panels + p0 * k;
  for (int h = 0; h < width / 8; ++h) {
    const int64_t r0 = p0 + 8 * h;
    const int live = int(std::clamp<int64_t>(m - r0, 0, 8));
    int64_t c = c0;
    for (; c + 8 <= std::min(c1, k_valid); c += 8) {
      __m256 v[8];
      for (int r = 0; r < 8; ++r) v[r] = r < live ? _mm256_loadu_ps(x + (r0 + r) * ldx + c) : _mm256_setzero_ps();
      transpose8x8(v);
      for (int j = 0; j < 8; ++j) _mm256_store_ps(dst + (c + j) * width + 8 * h, v[j]);
    }
    for (; c < c1; ++c)
      for (int r = 0; r < 8; ++r) dst[c * width + 8 * h + r] = r < live && c < k_valid ? x[(r0 + r) * ldx + c] : 0.0f;
  }
}

}  // namespace
#endif

void pack_x_panels(const float* x, int64_t ldx, int64_t m, int64_t k_valid, int64_t k, float* panels, int nthreads) {
#if PQ_X86
  const bool gather = simd_level() >= Simd::kAvx512;  // read outside the region: it may throw
  // The gather's indices are 32-bit: 15 row strides must fit.
  if (gather && ldx > (int64_t(1) << 31) / 16) throw std::invalid_argument("pack_x_panels: row stride too large");
  constexpr int64_t kCols = 256;
  std::vector<int64_t> starts;  // first row of each panel
  for (int64_t p0 = 0; p0 < m; p0 += panel_width(m, p0)) starts.push_back(p0);
  const int64_t pieces = (k + kCols - 1) / kCols, items = int64_t(starts.size()) * pieces;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (items > 1 && m * k >= (int64_t(1) << 16))
  for (int64_t t = 0; t < items; ++t) {
    const int64_t p0 = starts[size_t(t / pieces)], c0 = (t % pieces) * kCols;
    if (gather) {
      pack_piece(x, ldx, m, k_valid, p0, panel_width(m, p0), c0, std::min(k, c0 + kCols), k, panels);
    } else {
      pack_piece_avx2(x, ldx, m, k_valid, p0, panel_width(m, p0), c0, std::min(k, c0 + kCols), k, panels);
    }
  }
#else
  throw std::logic_error("pack_x_panels called on a non-x86 build");
#endif
}

#if PQ_X86
namespace {

using TileFn = void (*)(const float* xp, const float* w, int64_t ldw, int64_t kc, float* yt, int64_t ldyt);

// MR weight rows x NV * 16 rows of x.
template <int MR, int NV>
PQ_TARGET_AVX512 void outer_tile(const float* xp, const float* w, int64_t ldw, int64_t kc, float* yt, int64_t ldyt) {
  __m512 acc[MR][NV];
  for (int j = 0; j < MR; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = _mm512_setzero_ps();
  for (int64_t c = 0; c < kc; ++c) {
    __m512 xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = _mm512_load_ps(xp + c * (NV * 16) + 16 * v);
    for (int j = 0; j < MR; ++j) {
      const __m512 wb = _mm512_set1_ps(w[j * ldw + c]);
      for (int v = 0; v < NV; ++v) acc[j][v] = _mm512_fmadd_ps(wb, xv[v], acc[j][v]);
    }
  }
  for (int j = 0; j < MR; ++j) {
    for (int v = 0; v < NV; ++v) {
      float* o = yt + j * ldyt + 16 * v;
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[j][v]));
    }
  }
}

// Weight rows per tile call for NV vectors of x: 6 x 4, 6 x 3 and 6 x 2 keep
// 24, 18 and 12 accumulators; with one vector of x, 12 rows keep the FMA
// units fed.
constexpr int group_rows(int nv) { return nv == 1 ? 12 : 6; }

template <int NV, int... MR>
constexpr auto tile_table(std::integer_sequence<int, MR...>) {
  return std::array<TileFn, sizeof...(MR)>{outer_tile<MR + 1, NV>...};
}

const auto kTiles1 = tile_table<1>(std::make_integer_sequence<int, group_rows(1)>{});
const auto kTiles2 = tile_table<2>(std::make_integer_sequence<int, group_rows(2)>{});
const auto kTiles3 = tile_table<3>(std::make_integer_sequence<int, group_rows(3)>{});
const auto kTiles4 = tile_table<4>(std::make_integer_sequence<int, group_rows(4)>{});

TileFn tile_fn(int nv, int mr) {
  const size_t j = size_t(mr - 1);
  return nv == 1 ? kTiles1[j] : nv == 2 ? kTiles2[j] : nv == 3 ? kTiles3[j] : kTiles4[j];
}

// The ymm tile: MR weight rows x one 16-row vector of a panel (two ymm),
// 12 accumulators at MR = 6 + 2 x vectors + a broadcast, 8 loads per 12
// FMAs: FMA-bound on a core with two 256-bit FMA pipes and three load ports.
template <int MR>
PQ_TARGET_AVX2 void outer_tile_ymm(const float* xp, int64_t xstride, const float* w, int64_t ldw, int64_t kc, float* yt,
                                   int64_t ldyt) {
  // Every loop over j unrolled: GCC left the store loop rolled, and so kept
  // the 12 accumulators in registers and also stored all of them to the
  // stack every step (12 stores per 12 FMAs: half speed on a core that
  // stores one ymm per cycle).
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 8
  for (int j = 0; j < MR; ++j) lo[j] = hi[j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < kc; ++c) {
    const __m256 x0 = _mm256_load_ps(xp + c * xstride), x1 = _mm256_load_ps(xp + c * xstride + 8);
#pragma GCC unroll 8
    for (int j = 0; j < MR; ++j) {
      const __m256 wb = _mm256_broadcast_ss(w + j * ldw + c);
      lo[j] = _mm256_fmadd_ps(wb, x0, lo[j]);
      hi[j] = _mm256_fmadd_ps(wb, x1, hi[j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < MR; ++j) {
    float* o = yt + j * ldyt;
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), lo[j]));
    _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), hi[j]));
  }
}

using YmmTileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);
constexpr int kYmmGroupRows = 6;
// Columns per tile call: a 16-row vector of x over 256 columns is 16 KiB,
// which fits L1 beside the group's 6 weight rows (6 KiB). (64, 128 and 256
// measured alike on Zen 3, Int4 and NF4 at M = 128.)
constexpr int64_t kYmmSubK = 256;
constexpr YmmTileFn kYmmTiles[kYmmGroupRows] = {outer_tile_ymm<1>, outer_tile_ymm<2>, outer_tile_ymm<3>,
                                                outer_tile_ymm<4>, outer_tile_ymm<5>, outer_tile_ymm<6>};

}  // namespace
#endif

void panel_gemm_avx2(const float* panels, int64_t m, int64_t k, int64_t k0, int64_t kc, const float* w, int64_t ldw,
                     int rows, float* yt, int64_t ldyt) {
#if PQ_X86
  for (int64_t p0 = 0; p0 < m; p0 += panel_width(m, p0)) {
    const int width = panel_width(m, p0);
    for (int64_t s0 = 0; s0 < kc; s0 += kYmmSubK) {
      const int64_t len = std::min<int64_t>(kYmmSubK, kc - s0);
      const float* xp = panels + p0 * k + (k0 + s0) * width;
      for (int j = 0; j < rows; j += kYmmGroupRows) {
        const int mr = std::min(kYmmGroupRows, rows - j);
        for (int v = 0; v < width / 16; ++v)
          kYmmTiles[mr - 1](xp + 16 * v, width, w + j * ldw + s0, ldw, len, yt + j * ldyt + p0 + 16 * v, ldyt);
      }
    }
  }
#else
  throw std::logic_error("panel_gemm_avx2 called on a non-x86 build");
#endif
}

// Eight outputs of one row of y from eight rows of yt, transposed in
// registers: yt is read in 8 x 8 blocks along its rows.
PQ_TARGET_AVX2 void add_transposed_avx2(const float* yt, int64_t ldyt, int rows, int64_t m, float* y, int64_t ldy) {
#if PQ_X86
  int j0 = 0;
  for (; j0 + 8 <= rows; j0 += 8) {
    int64_t i0 = 0;
    for (; i0 + 8 <= m; i0 += 8) {
      __m256 v[8];
      for (int j = 0; j < 8; ++j) v[j] = _mm256_loadu_ps(yt + (j0 + j) * ldyt + i0);
      transpose8x8(v);
      for (int i = 0; i < 8; ++i) {
        float* o = y + (i0 + i) * ldy + j0;
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), v[i]));
      }
    }
    for (; i0 < m; ++i0)
      for (int j = 0; j < 8; ++j) y[i0 * ldy + j0 + j] += yt[(j0 + j) * ldyt + i0];
  }
  for (; j0 < rows; ++j0)
    for (int64_t i = 0; i < m; ++i) y[i * ldy + j0] += yt[j0 * ldyt + i];
#else
  throw std::logic_error("add_transposed_avx2 called on a non-x86 build");
#endif
}

// 16 outputs of one row of y from 16 rows of yt: a gather and a vector add.
PQ_TARGET_AVX512 void add_transposed_avx512(const float* yt, int64_t ldyt, int rows, int64_t m, float* y,
                                            int64_t ldy) {
#if PQ_X86
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(int32_t(ldyt)));
  for (int j0 = 0; j0 < rows; j0 += 16) {
    const int live = std::min(16, rows - j0);
    const __mmask16 mask = __mmask16((uint32_t(1) << live) - 1);
    for (int64_t i = 0; i < m; ++i) {
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, idx, yt + j0 * ldyt + i, 4);
      float* o = y + i * ldy + j0;
      _mm512_mask_storeu_ps(o, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, o), v));
    }
  }
#else
  throw std::logic_error("add_transposed_avx512 called on a non-x86 build");
#endif
}

void panel_gemm_avx512(const float* panels, int64_t m, int64_t k, int64_t k0, int64_t kc, const float* w, int64_t ldw,
                       int rows, float* yt, int64_t ldyt) {
#if PQ_X86
  for (int64_t p0 = 0; p0 < m; p0 += panel_width(m, p0)) {
    const int width = panel_width(m, p0), nv = width / 16, group = group_rows(nv);
    const float* xp = panels + p0 * k + k0 * width;
    for (int j = 0; j < rows; j += group) {
      const int mr = std::min(group, rows - j);
      tile_fn(nv, mr)(xp, w + j * ldw, ldw, kc, yt + j * ldyt + p0, ldyt);
    }
  }
#else
  throw std::logic_error("panel_gemm_avx512 called on a non-x86 build");
#endif
}

const PanelGemm* panel_gemm_for(Simd level, int64_t m) {
  static const PanelGemm kAvx512{panel_gemm_avx512, add_transposed_avx512};
  static const PanelGemm kAvx2{panel_gemm_avx2, add_transposed_avx2};
  if (level >= Simd::kAvx512) return m >= kOuterTileMinM ? &kAvx512 : nullptr;
  return level >= Simd::kAvx2 && m >= kOuterTileMinMAvx2 ? &kAvx2 : nullptr;
}

}  // namespace pyquant
