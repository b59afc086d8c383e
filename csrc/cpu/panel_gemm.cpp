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

}  // namespace
#endif

void pack_x_panels(const float* x, int64_t ldx, int64_t m, int64_t k_valid, int64_t k, float* panels, int nthreads) {
#if PQ_X86
  // The gather's indices are 32-bit: 15 row strides must fit.
  if (ldx > (int64_t(1) << 31) / 16) throw std::invalid_argument("pack_x_panels: row stride too large");
  constexpr int64_t kCols = 256;
  std::vector<int64_t> starts;  // first row of each panel
  for (int64_t p0 = 0; p0 < m; p0 += panel_width(m, p0)) starts.push_back(p0);
  const int64_t pieces = (k + kCols - 1) / kCols, items = int64_t(starts.size()) * pieces;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (items > 1 && m * k >= (int64_t(1) << 16))
  for (int64_t t = 0; t < items; ++t) {
    const int64_t p0 = starts[size_t(t / pieces)], c0 = (t % pieces) * kCols;
    pack_piece(x, ldx, m, k_valid, p0, panel_width(m, p0), c0, std::min(k, c0 + kCols), k, panels);
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

}  // namespace
#endif

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

}  // namespace pyquant
