// Fused GGUF matmul y = x @ W_hat.T (+ bias) on the CPU, fp32 throughout.
//
// Two schemes, neither of which materialises the float weight:
//  * M == 1 (decode, GEMV) for Q4_K, Q6_K and Q8_0 with AVX2: the codes of a
//    block are widened in registers and multiplied straight into x; the
//    block/sub-block scale is applied once per sub-block partial sum, and the
//    Q4_K minimum term uses per-32 sums of x computed once per call. On a core
//    this path is bound by the integer->float conversions, not by memory, so
//    the work per weight is kept to a widen, a convert and an FMA.
//  * otherwise (any type, any M; also M == 1 on the scalar path): a thread
//    owns a tile of kTileN weight rows and walks K in chunks of kChunkK
//    weights; it decodes that slice of the tile once into a small fp32
//    buffer (48 KiB, L2-resident) with the exact dequantize kernels and
//    multiplies it against every row of x in register tiles of kMR rows of
//    x by kNR weight rows (12 accumulators: 7 loads feed 12 FMAs), so
//    decoding costs O(N*K) regardless of M. Past a few hundred rows of x the
//    x chunk no longer fits in L2 and torch's GEMM wins; the Python glue
//    switches to it there (pyquant/ops/cpu_gguf.py).
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "avx2_reduce.h"
#include "gguf_avx2.h"  // x86 only; empty elsewhere
#include "gguf_kernels.h"
#include "micro_gemm.h"
#include "panel_gemm.h"

namespace pyquant {
namespace gguf {
namespace {

constexpr int kTileN = 12;      // weight rows per thread task (a multiple of kNR)
constexpr int kChunkK = 1024;   // weights per row decoded at a time (a multiple of 256)
constexpr int kMR = kMicroMR;   // x rows per register tile
constexpr int kNR = kMicroNR;   // weight rows per register tile
// Rows of x per pass of the outer-product tile: their panels (256 x kChunkK
// fp32, 1 MiB) stay in L2 while the tiles sweep them.
constexpr int64_t kPanelBlockM = 256;

// ------------------------------------------------------ tiled (any type) ---

inline void prefetch(const uint8_t* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

void qmatmul_tiled(int type, const float* x, const uint8_t* w, const float* bias, float* y, int64_t M, int64_t N,
                   int64_t K, int nthreads, Simd level) {
  const DecodeRangeFn decode = decode_range_fn(type, level);
  const int bs = block_size(type), ts = type_size(type);
  const int64_t row_bytes = K / bs * ts;
  const int64_t kc = std::min<int64_t>(K, kChunkK);  // K and kChunkK are multiples of bs
  const int64_t ntiles = (N + kTileN - 1) / kTileN;
  // Work in multiply-adds, counting the decode of a weight as ~2 of them.
  nthreads = int(std::min<int64_t>(threads_for(N * K * (M + 2), int64_t(1) << 20, nthreads), ntiles));
  // From kOuterTileMinM rows, the outer-product tile on x repacked
  // (panel_gemm.h), kPanelBlockM rows of x at a time so that their panels
  // stay in L2 while the tiles sweep them; each tile's outputs are summed
  // transposed.
  const PanelGemm* outer = panel_gemm_for(level, M);
  const int64_t block_m = outer ? std::min(M, kPanelBlockM) : M, ldyt = padded_rows(block_m);
  // Allocated before the parallel region: an allocation failure must surface
  // as a Python exception, not terminate inside OpenMP.
  std::vector<float> buffers(size_t(nthreads) * kTileN * kc);
  float* const x_panels = outer ? thread_scratch(x_panels_floats(block_m, K), Scratch::kXPanels) : nullptr;
  float* const yt_all = outer ? thread_scratch(nthreads * kTileN * ldyt, Scratch::kYTransposed) : nullptr;
  MicroGemmFn micro[kMR][kNR];
  for (int a = 0; a < kMR; ++a)
    for (int b = 0; b < kNR; ++b) micro[a][b] = micro_gemm_fn(a + 1, b + 1, level >= Simd::kAvx2, level >= Simd::kAvx512);

  for (int64_t i0 = 0; i0 < M; i0 += block_m) {
    const int64_t mb = std::min(block_m, M - i0);
    const float* xb = x + i0 * K;
    float* yb = y + i0 * N;
    if (outer) pack_x_panels(xb, K, mb, K, K, x_panels, nthreads);
#pragma omp parallel num_threads(nthreads)
    {
      float* wbuf = buffers.data() + size_t(omp_get_thread_num()) * kTileN * kc;
      float* yt = outer ? yt_all + omp_get_thread_num() * kTileN * ldyt : nullptr;
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t n0 = t * kTileN;
        const int nt = int(std::min<int64_t>(kTileN, N - n0));
        for (int64_t m = 0; m < mb; ++m)
          for (int r = 0; r < nt; ++r) yb[m * N + n0 + r] = bias ? bias[n0 + r] : 0.f;
        if (yt) std::fill(yt, yt + nt * ldyt, 0.0f);
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
          const int64_t len = std::min(kc, K - k0);
          for (int r = 0; r < nt; ++r) {
            const uint8_t* src = w + (n0 + r) * row_bytes + k0 / bs * ts;
            decode(src, wbuf + r * kc, len / bs);
            // The tile reads kTileN rows in pieces of ~1 KiB: too many short
            // streams for the hardware prefetcher, so each row's next piece
            // (or the next tile's first piece) is requested while this one is
            // multiplied.
            if (k0 + kc < K)
              prefetch(src + len / bs * ts, std::min(kc, K - k0 - kc) / bs * ts);
            else if (n0 + kTileN + r < N)
              prefetch(w + (n0 + kTileN + r) * row_bytes, kc / bs * ts);
          }
          if (yt) {
            outer->gemm(x_panels, mb, K, k0, len, wbuf, kc, nt, yt, ldyt);
            continue;
          }
          for (int64_t m0 = 0; m0 < mb; m0 += kMR) {
            const int mr = int(std::min<int64_t>(kMR, mb - m0));
            for (int j = 0; j < nt; j += kNR) {
              const int nr = std::min(kNR, nt - j);
              micro[mr - 1][nr - 1](xb + m0 * K + k0, K, wbuf + j * kc, kc, len, yb + m0 * N + n0 + j, N);
            }
          }
        }
        if (yt) outer->add_transposed(yt, ldyt, nt, mb, yb + n0, N);
      }
    }
  }
}

// ------------------------------------------------- fused GEMV (AVX2, M=1) ---
#if PQ_X86

// Software prefetch distance for the weight streams: the first touch of each
// block otherwise stalls on memory (block fields are read out of order, e.g.
// Q6_K scales at byte 192 before the codes at byte 0).
constexpr int kAhead = 1024;

using avx2::f16_at;

// R consecutive Q4_K rows against x. xsum[j] = sum of x over sub-block j,
// so the min term is one 8-wide FMA per block: sum_j dmin*m_j * xsum_j.
template <int R>
PQ_TARGET_AVX2 void gemv_q4_k(const uint8_t* w, int64_t row_bytes, const float* x, const float* xsum, int64_t nb,
                              float* y) {
  __m256 acc[R], mins[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), mins[r] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi32(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK;
    const __m256 xs = _mm256_loadu_ps(xsum + b * 8);
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * row_bytes + b * LayoutQ4_K::kBytes;
      prefetch(blk + kAhead, LayoutQ4_K::kBytes);
      __m256 vdl, vml;
      avx2::k_scales(blk, vdl, vml);
      mins[r] = _mm256_fmadd_ps(vml, xs, mins[r]);
      alignas(32) float dl[8];
      _mm256_store_ps(dl, vdl);
      const uint8_t* qs = blk + LayoutQ4_K::kQs;
      for (int c = 0; c < 4; ++c) {
        __m256 tlo = _mm256_setzero_ps(), thi = _mm256_setzero_ps();
        for (int g = 0; g < 4; ++g) {
          const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + c * 32 + g * 8)));
          tlo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m4)), _mm256_loadu_ps(xb + c * 64 + g * 8), tlo);
          thi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), _mm256_loadu_ps(xb + c * 64 + 32 + g * 8),
                                thi);
        }
        acc[r] = _mm256_fmadd_ps(tlo, _mm256_broadcast_ss(dl + 2 * c), acc[r]);
        acc[r] = _mm256_fmadd_ps(thi, _mm256_broadcast_ss(dl + 2 * c + 1), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) y[r] = hsum_avx2(_mm256_sub_ps(acc[r], mins[r]));
}

PQ_TARGET_AVX2 inline __m256 widen_s8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

template <int R>
PQ_TARGET_AVX2 void gemv_q6_k(const uint8_t* w, int64_t row_bytes, const float* x, const float*, int64_t nb,
                              float* y) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK;
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * row_bytes + b * LayoutQ6_K::kBytes;
      prefetch(blk + kAhead, LayoutQ6_K::kBytes);
      alignas(32) float dl[16];
      avx2::q6k_scales(blk, dl);
      for (int h = 0; h < 2; ++h) {
        __m256i q[4];
        avx2::q6k_half(blk, h, q);
        for (int s = 0; s < 4; ++s) {
          const __m256i qv = q[s];
          const __m128i lo = _mm256_castsi256_si128(qv), hi = _mm256_extracti128_si256(qv, 1);
          const float* xs = xb + h * 128 + s * 32;
          __m256 t0 = _mm256_mul_ps(widen_s8(lo), _mm256_loadu_ps(xs));
          t0 = _mm256_fmadd_ps(widen_s8(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xs + 8), t0);
          __m256 t1 = _mm256_mul_ps(widen_s8(hi), _mm256_loadu_ps(xs + 16));
          t1 = _mm256_fmadd_ps(widen_s8(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xs + 24), t1);
          const int j = h * 8 + s * 2;
          acc[r] = _mm256_fmadd_ps(t0, _mm256_broadcast_ss(dl + j), acc[r]);
          acc[r] = _mm256_fmadd_ps(t1, _mm256_broadcast_ss(dl + j + 1), acc[r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) y[r] = hsum_avx2(acc[r]);
}

template <int R>
PQ_TARGET_AVX2 void gemv_q8_0(const uint8_t* w, int64_t row_bytes, const float* x, const float*, int64_t nb,
                              float* y) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * 32;
    const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
    const __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * row_bytes + b * LayoutQ8_0::kBytes;
      __builtin_prefetch(blk + kAhead, 0, 3);  // blocks are shorter than a line
      const uint8_t* q = blk + LayoutQ8_0::kQs;
      auto ld = [&](int o) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + o)); };
      __m256 t = _mm256_mul_ps(widen_s8(ld(0)), x0);
      t = _mm256_fmadd_ps(widen_s8(ld(8)), x1, t);
      t = _mm256_fmadd_ps(widen_s8(ld(16)), x2, t);
      t = _mm256_fmadd_ps(widen_s8(ld(24)), x3, t);
      acc[r] = _mm256_fmadd_ps(t, _mm256_set1_ps(f16_at(blk + LayoutQ8_0::kD)), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = hsum_avx2(acc[r]);
}

using GemvFn = void (*)(const uint8_t*, int64_t, const float*, const float*, int64_t, float*);

bool gemv_fns(int type, GemvFn fns[4]) {
#define PQ_GEMV_CASE(T, F)                                 \
  case T:                                                  \
    fns[0] = F<1>, fns[1] = F<2>, fns[2] = F<3>, fns[3] = F<4>; \
    return true;
  switch (type) {
    PQ_GEMV_CASE(kQ4_K, gemv_q4_k)
    PQ_GEMV_CASE(kQ6_K, gemv_q6_k)
    PQ_GEMV_CASE(kQ8_0, gemv_q8_0)
    default: return false;
  }
#undef PQ_GEMV_CASE
}

// Rows in groups of 4 so one load of x feeds four weight streams.
void gemv_fused(int type, const GemvFn fns[4], const float* x, const uint8_t* w, const float* bias, float* y,
                int64_t N, int64_t K, int nthreads) {
  const int bs = block_size(type), ts = type_size(type);
  const int64_t nb = K / bs, row_bytes = nb * ts;
  std::vector<float> xsum;
  if (type == kQ4_K) {  // the min term: sum_j dmin*m_j * sum(x over sub-block j)
    xsum.resize(size_t(K / 32));
    for (int64_t j = 0; j < K / 32; ++j) {
      float s = 0.f;
      for (int i = 0; i < 32; ++i) s += x[j * 32 + i];
      xsum[size_t(j)] = s;
    }
  }
  const float* xs = xsum.empty() ? nullptr : xsum.data();
  const int64_t groups = (N + 3) / 4;
  nthreads = int(std::min<int64_t>(threads_for(N * K, int64_t(1) << 18, nthreads), groups));
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t n0 = g * 4;
    const int r = int(std::min<int64_t>(4, N - n0));
    fns[r - 1](w + n0 * row_bytes, row_bytes, x, xs, nb, y + n0);
    if (bias)
      for (int i = 0; i < r; ++i) y[n0 + i] += bias[n0 + i];
  }
}
#endif  // PQ_X86

}  // namespace

void qmatmul(int type, const float* x, const uint8_t* w, const float* bias, float* y, int64_t m, int64_t n,
             int64_t k, int nthreads) {
  if (!valid_type(type)) throw std::invalid_argument("unknown GGUF block type " + std::to_string(type));
  if (m <= 0 || n <= 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) y[i * n + j] = bias ? bias[j] : 0.f;
    return;
  }
  const Simd level = simd_level();
#if PQ_X86
  GemvFn fns[4];
  if (m == 1 && level >= Simd::kAvx2 && gemv_fns(type, fns)) {
    gemv_fused(type, fns, x, w, bias, y, n, k, nthreads);
    return;
  }
#endif
  qmatmul_tiled(type, x, w, bias, y, m, n, k, nthreads, level);
}

}  // namespace gguf
}  // namespace pyquant
