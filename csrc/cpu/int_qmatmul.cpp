// Int format: y = x @ W_hat.T (+ bias). Chooses the AVX2 GEMV (M <= 8, in
// passes of up to 4 rows of x) or the AVX2 GEMM, or the scalar fallback,
// which dequantizes one weight row at a time and takes dot products with
// every row of x.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "int_kernels.h"

namespace pyquant {
namespace {

void qmatmul_scalar(const float* x, int64_t m, const IntWeight& w, const float* bias, float* y, int nthreads) {
  const int64_t k = w.k, nch = w.chunks, cpg = w.chunks_per_group, rb = w.row_bytes;
  const int cb = int_chunk_bytes(w.bits);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> wrow(size_t(nch * kIntChunk));
    uint8_t codes[kIntChunk];
#pragma omp for schedule(static)
    for (int64_t n = 0; n < w.n; ++n) {
      const uint8_t* row = w.qweight + n * rb;
      for (int64_t c = 0; c < nch; ++c) {
        const float s = w.scale(n, c / cpg), z = w.zero(n, c / cpg);
        int_decode_chunk(row + c * cb, w.bits, codes);
        for (int j = 0; j < kIntChunk; ++j) wrow[c * kIntChunk + j] = (float(codes[j]) - z) * s;
      }
      const float* wr = wrow.data();
      for (int64_t i = 0; i < m; ++i) {
        const float* xr = x + i * k;
        // Eight independent partial sums: lets the compiler use SSE lanes
        // without -ffast-math reassociation.
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t kk = 0;
        for (; kk + 8 <= k; kk += 8) {
          for (int j = 0; j < 8; ++j) acc[j] += xr[kk + j] * wr[kk + j];
        }
        for (; kk < k; ++kk) acc[0] += xr[kk] * wr[kk];
        float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        y[i * w.n + n] = bias ? sum + bias[n] : sum;
      }
    }
  }
}

}  // namespace

void int_qmatmul(const float* x, int64_t m, const IntWeight& w, const float* bias, float* y, int nthreads) {
  if (m <= 0 || w.n <= 0) return;
#if PQ_X86
  if (simd_level() == Simd::kAvx2) {
    // The kernels read whole 32-code chunks of x: when K is ragged, give them
    // a copy padded with zeros (zero times any finite weight adds nothing).
    const int64_t kp = w.chunks * kIntChunk;
    std::vector<float> padded;
    const float* xp = x;
    if (kp != w.k) {
      padded.assign(size_t(m * kp), 0.0f);
      for (int64_t i = 0; i < m; ++i) memcpy(padded.data() + i * kp, x + i * w.k, sizeof(float) * w.k);
      xp = padded.data();
    }
    if (m <= kGemvPassMaxM) {
      // Up to 8 rows, passes of the GEMV (4 rows of x each) beat the GEMM:
      // re-decoding the weight once more costs less than the GEMM's tile
      // stores and its half-empty row blocks at this M (measured).
      for (int64_t i0 = 0; i0 < m; i0 += kGemvMaxM) {
        const int64_t mm = std::min<int64_t>(kGemvMaxM, m - i0);
        int_gemv_avx2(xp + i0 * kp, kp, mm, w, bias, y + i0 * w.n, nthreads);
      }
    } else {
      int_gemm_avx2(xp, kp, m, w, bias, y, nthreads);
    }
    return;
  }
#endif
  qmatmul_scalar(x, m, w, bias, y, nthreads);
}

}  // namespace pyquant
