// GPTQ's sequential in-block column update (the hot loop), fp32.
//
// Spec: pyquant/algorithms/gptq.py::gptq_block_update_reference. For the
// columns i in [start, stop) of a block W (N x B), in order:
//   q = clamp(round(w_i / s) + z, 0, maxq);  dq = (q - z) * s
//   e = (w_i - dq) / Hinv[i, i];  W[:, j] -= e * Hinv[i, j]  for j > i
// where (s, z) are the row's parameters of the group that holds column i.
//
// Every row is independent (its own scales, its own error feedback), so the
// kernel runs rows in tiles of kTile: the row tile (kTile x B floats, 4 KiB
// for B = 128) stays in L1 while each Hinv row segment is loaded once per
// tile instead of once per row, which is what makes the update compute- rather
// than bandwidth-bound (Hinv's block is 64 KiB, more than L1). OpenMP splits
// the tiles across threads.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "gptq_kernels.h"
#include "simd.h"

#if PQ_X86
#include <immintrin.h>
#endif

namespace pyquant {
namespace {

constexpr int kTile = 8;

// Quantizes column i of rows [r0, r0 + rows) and returns each row's scaled
// error in e[]. Division (not a reciprocal multiply) and round-half-even
// (nearbyint under the default rounding mode) match torch.round(w / s) bit for
// bit, so a GPTQ run whose Hessian is the identity reproduces RTN exactly.
inline void quantize_column(const GptqBlockArgs& a, int64_t r0, int rows, int64_t i, float* e) {
  const int64_t g = (i - a.start) / a.group_len;
  const float d = a.hinv[i * a.ldh + i];
  for (int r = 0; r < rows; ++r) {
    const int64_t row = r0 + r;
    const float s = a.scale[row * a.ldsz + g];
    const float z = a.zero[row * a.ldsz + g];
    const float w = a.w[row * a.ldw + i];
    float q = std::nearbyint(w / s) + z;
    q = std::min(std::max(q, 0.0f), a.maxq);
    const float dq = (q - z) * s;
    const float err = (w - dq) / d;
    a.codes[row * a.ldc + (i - a.start)] = static_cast<uint8_t>(q);
    a.err[row * a.lde + (i - a.start)] = err;
    e[r] = err;
  }
}

void tile_scalar(const GptqBlockArgs& a, int64_t r0, int rows) {
  float e[kTile];
  for (int64_t i = a.start; i < a.stop; ++i) {
    quantize_column(a, r0, rows, i, e);
    const float* h = a.hinv + i * a.ldh;
    for (int r = 0; r < rows; ++r) {
      float* wr = a.w + (r0 + r) * a.ldw;
      const float er = e[r];
      for (int64_t j = i + 1; j < a.b; ++j) wr[j] -= er * h[j];
    }
  }
}

#if PQ_X86
template <int R>
PQ_TARGET_AVX2 void tile_avx2_fixed(const GptqBlockArgs& a, int64_t r0) {
  float e[kTile];
  float* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = a.w + (r0 + r) * a.ldw;
  for (int64_t i = a.start; i < a.stop; ++i) {
    quantize_column(a, r0, R, i, e);
    const float* h = a.hinv + i * a.ldh;
    int64_t j = i + 1;
    // Scalar head up to a multiple of 8 so the vector loop needs no mask.
    for (; j < a.b && (j & 7); ++j)
      for (int r = 0; r < R; ++r) wr[r][j] -= e[r] * h[j];
    __m256 ev[R];
    for (int r = 0; r < R; ++r) ev[r] = _mm256_set1_ps(-e[r]);
    for (; j + 8 <= a.b; j += 8) {
      const __m256 hv = _mm256_loadu_ps(h + j);
      for (int r = 0; r < R; ++r)
        _mm256_storeu_ps(wr[r] + j, _mm256_fmadd_ps(ev[r], hv, _mm256_loadu_ps(wr[r] + j)));
    }
    for (; j < a.b; ++j)
      for (int r = 0; r < R; ++r) wr[r][j] -= e[r] * h[j];
  }
}

PQ_TARGET_AVX2 void tile_avx2(const GptqBlockArgs& a, int64_t r0, int rows) {
  switch (rows) {
    case 8: tile_avx2_fixed<8>(a, r0); break;
    case 7: tile_avx2_fixed<7>(a, r0); break;
    case 6: tile_avx2_fixed<6>(a, r0); break;
    case 5: tile_avx2_fixed<5>(a, r0); break;
    case 4: tile_avx2_fixed<4>(a, r0); break;
    case 3: tile_avx2_fixed<3>(a, r0); break;
    case 2: tile_avx2_fixed<2>(a, r0); break;
    default: tile_avx2_fixed<1>(a, r0); break;
  }
}
#endif

}  // namespace

void gptq_block_update(const GptqBlockArgs& a, int nthreads) {
  const int64_t tiles = (a.n + kTile - 1) / kTile;
  const bool avx2 = PQ_X86 && simd_has_avx2();
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = t * kTile;
    const int rows = static_cast<int>(std::min<int64_t>(kTile, a.n - r0));
#if PQ_X86
    if (avx2) {
      tile_avx2(a, r0, rows);
      continue;
    }
#endif
    tile_scalar(a, r0, rows);
  }
}

}  // namespace pyquant
