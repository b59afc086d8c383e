// Int format: y = x @ W_hat.T (+ bias). Chooses, for 4-bit codes at the
// avx512 level, the bf16 kernel (bf16 x, M <= 64, int4_bf16.cpp) or the
// table kernel (fp32 x, M <= 8, int4_table.cpp); else the AVX2 GEMV (M <= 8, in
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

void qmatmul_scalar(const float* x, int64_t m, const IntWeight& w, const float* bias, const LoraEpilogue& lora,
                    float* y, int nthreads) {
  const int64_t k = w.k, nch = w.chunks, cpg = w.chunks_per_group, rb = w.row_bytes;
  const int cb = int_chunk_bytes(w.bits);
  // One dequantized row per thread, allocated here: an exception must not
  // escape an OpenMP region.
  const int64_t rowlen = nch * kIntChunk;
  std::vector<float> rows(size_t(rowlen * std::max(nthreads, 1)));
#pragma omp parallel num_threads(nthreads)
  {
    float* wrow = rows.data() + rowlen * omp_get_thread_num();
    uint8_t codes[kIntChunk];
#pragma omp for schedule(static)
    for (int64_t n = 0; n < w.n; ++n) {
      const uint8_t* row = w.qweight + n * rb;
      for (int64_t c = 0; c < nch; ++c) {
        const float s = w.scale(n, c / cpg), z = w.zero(n, c / cpg);
        int_decode_chunk(row + c * cb, w.bits, codes);
        for (int j = 0; j < kIntChunk; ++j) wrow[c * kIntChunk + j] = (float(codes[j]) - z) * s;
      }
      const float* wr = wrow;
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
      lora.apply(y, w.n, 0, m, n, n + 1);
    }
  }
}

// x rows as fp32, padded with zeros to `cols` columns.
std::vector<float> x_as_f32(const void* x, int dtype, int64_t m, int64_t k, int64_t cols) {
  std::vector<float> out(size_t(m * cols), 0.0f);
  for (int64_t i = 0; i < m; ++i) {
    if (dtype == kF32) {
      memcpy(out.data() + i * cols, static_cast<const float*>(x) + i * k, sizeof(float) * k);
    } else {
      for (int64_t j = 0; j < k; ++j) out[size_t(i * cols + j)] = load_float(x, i * k + j, dtype);
    }
  }
  return out;
}

}  // namespace

void int_qmatmul(const void* x, int x_dtype, int64_t m, const IntWeight& w, const float* bias,
                 const LoraEpilogue& lora, float* y, int nthreads) {
  if (m <= 0 || w.n <= 0) return;
  const size_t esize = x_dtype == kF32 ? 4 : 2;
  if (int4_bf16_route(x_dtype, m, w))
    return int4_bf16_qmatmul(static_cast<const uint16_t*>(x), m, w, bias, lora, y, nthreads);
  if (int4_table_route(x_dtype, m, w))
    return int4_table_qmatmul(static_cast<const float*>(x), m, w, bias, lora, y, nthreads);
#if PQ_X86
  if (simd_has_avx2()) {
    if (m <= kGemvPassMaxM) {
      // Up to 8 rows, passes of the GEMV (4 rows of x each) beat the GEMM:
      // re-decoding the weight once more costs less than the GEMM's tile
      // stores and its half-empty row blocks at this M (measured). The GEMV
      // reads x in any dtype and handles a ragged K itself.
      for (int64_t i0 = 0; i0 < m; i0 += kGemvMaxM) {
        const int64_t mm = std::min<int64_t>(kGemvMaxM, m - i0);
        LoraEpilogue pass = lora;  // this pass's rows of x
        if (pass.xa) pass.xa += i0 * pass.rank;
        int_gemv_avx2(static_cast<const char*>(x) + i0 * w.k * esize, x_dtype, w.k, mm, w, bias, pass,
                      y + i0 * w.n, nthreads);
      }
      return;
    }
    // The GEMM reads whole 32-code chunks of fp32 x: when K is ragged or x
    // is half precision, give it a padded fp32 copy (zero times any finite
    // weight adds nothing).
    const int64_t kp = w.chunks * kIntChunk;
    for (int64_t i0 = 0; i0 < m; i0 += kGemmBlockM) {
      const int64_t mm = std::min<int64_t>(kGemmBlockM, m - i0);
      LoraEpilogue block = lora;  // this block's rows of x
      if (block.xa) block.xa += i0 * block.rank;
      const char* xb = static_cast<const char*>(x) + i0 * w.k * esize;
      if (kp == w.k && x_dtype == kF32) {
        int_gemm_avx2(reinterpret_cast<const float*>(xb), kp, mm, w, bias, block, y + i0 * w.n, nthreads);
      } else {
        const std::vector<float> xf = x_as_f32(xb, x_dtype, mm, w.k, kp);
        int_gemm_avx2(xf.data(), kp, mm, w, bias, block, y + i0 * w.n, nthreads);
      }
    }
    return;
  }
#endif
  if (x_dtype == kF32) {
    qmatmul_scalar(static_cast<const float*>(x), m, w, bias, lora, y, nthreads);
  } else {
    const std::vector<float> xf = x_as_f32(x, x_dtype, m, w.k, w.k);
    qmatmul_scalar(xf.data(), m, w, bias, lora, y, nthreads);
  }
}

}  // namespace pyquant
