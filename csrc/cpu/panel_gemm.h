// The avx512 register tile of the float GEMMs that decode a weight tile into
// an fp32 buffer first (Int GEMM, NF4 and GGUF tiled paths), as an outer
// product rather than dot products.
//
// x is repacked once per call into panels of kPanelRows rows stored k-major
// (for each column, the panel's 48 values are contiguous), so one column of
// a panel is three zmm loads. The tile then broadcasts one decoded weight per
// weight row and multiplies it into those three vectors: 6 weight rows x 48
// rows of x keep 18 accumulators, 3 x vectors and a broadcast in registers,
// 9 loads per 18 FMAs, and no horizontal sums (each lane is one output).
// The dot-product tile (micro_gemm.h, 4 x 3; still used below
// kOuterTileMinM rows) ran at 47% of this Zen 5 core's FMA peak on an
// L1-resident 12 x 512 tile, this one at 94-98%. In the Int GEMM, 4096 x
// 4096 at M = 256 on one core, the whole call (packing, decode, outputs
// included) runs at 80% of that peak.
//
// Each output is summed over k in order within [k0, k0 + kc), so results do
// not depend on the thread count.
#pragma once
#include <cstdint>

#include "simd.h"
#include "thread_scratch.h"

namespace pyquant {

constexpr int kPanelRows = 48;  // rows of x per panel: three 16-lane vectors

// Below this many rows of x the tile multiplies mostly padding (its vectors
// hold 16 rows) and micro_gemm.h's dot-product tile, whose work scales with
// the rows, is the faster one (GGUF exact, 4096 x 4096, 2 threads: 1.4 ms
// at M = 7 with the dot tile, 2.1 ms at M = 8 and 16 with this one). The
// ymm tile takes over later: on Zen 3 (Int4, NF4, 4096 x 4096) the dot tile
// was 1.03-1.17x faster at M = 12, level at 14, 1.06-1.17x slower at 16.
constexpr int64_t kOuterTileMinM = 12;
constexpr int64_t kOuterTileMinMAvx2 = 16;

// x's rows, padded to whole vectors: the panels' rows and the transposed
// outputs' row stride.
inline int64_t padded_rows(int64_t m) { return (m + 15) / 16 * 16; }

// Rows in the panel that starts at row p0. Panels are kPanelRows rows, except
// at the end: 16 rows left over join the last full panel (64 rows, four
// vectors; a one-vector tile runs at ~80% of the FMA rate, the others at
// 94-98%), 32 make a panel of their own. A panel starting at row p0 sits at
// float p0 * k, its column c at offset c * width.
inline int panel_width(int64_t m, int64_t p0) {
  const int64_t left = padded_rows(m) - p0;
  return left == kPanelRows + 16 ? kPanelRows + 16 : int(left < kPanelRows ? left : kPanelRows);
}

// Floats needed for the panels of an m x k x.
inline int64_t x_panels_floats(int64_t m, int64_t k) { return padded_rows(m) * k; }

// Columns [0, k_valid) of x (m rows, row stride ldx) into panels of width k;
// columns [k_valid, k) and the rows past m of the last panel become 0.
// Needs the avx2 level (gathers at the avx512 level, transposes below).
void pack_x_panels(const float* x, int64_t ldx, int64_t m, int64_t k_valid, int64_t k, float* panels, int nthreads);

// yt[j * ldyt + i] += sum_{c in [k0, k0 + kc)} x[i, c] * w[j, c - k0] for
// every row i of the packed x and j < rows, w row-major with stride ldw (a
// decoded tile). The output is transposed (lanes are rows of x) so a tile
// adds its 18 vectors to it instead of 288 scattered floats per K block; the
// caller adds it to y once, with add_transposed_avx512. ldyt >=
// padded_rows(m). Needs the avx512 level.
void panel_gemm_avx512(const float* panels, int64_t m, int64_t k, int64_t k0, int64_t kc, const float* w, int64_t ldw,
                       int rows, float* yt, int64_t ldyt);

// y[i * ldy + j] += yt[j * ldyt + i] for i < m, j < rows (ldyt < 2^27).
void add_transposed_avx512(const float* yt, int64_t ldyt, int rows, int64_t m, float* y, int64_t ldy);

// The same at the avx2 level, on the same panels: each 16-row vector of a
// panel is two ymm, against 6 weight rows at a time (the 6 x 16 tile of the
// classic AVX2 SGEMM kernels, with x in the role of the packed B panel).
void panel_gemm_avx2(const float* panels, int64_t m, int64_t k, int64_t k0, int64_t kc, const float* w, int64_t ldw,
                     int rows, float* yt, int64_t ldyt);
void add_transposed_avx2(const float* yt, int64_t ldyt, int rows, int64_t m, float* y, int64_t ldy);

// The outer-product tile for m rows of x at a level, or null where the
// dot-product tile is the one to use (fewer rows than the level's threshold,
// or the scalar level).
struct PanelGemm {
  void (*gemm)(const float* panels, int64_t m, int64_t k, int64_t k0, int64_t kc, const float* w, int64_t ldw,
               int rows, float* yt, int64_t ldyt);
  void (*add_transposed)(const float* yt, int64_t ldyt, int rows, int64_t m, float* y, int64_t ldy);
};
const PanelGemm* panel_gemm_for(Simd level, int64_t m);

}  // namespace pyquant
