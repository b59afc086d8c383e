// NF4 qmatmul on the CPU: y (M, N) = x (M, K) @ W^T (+ bias), fp32, without
// materialising the float weight.
//
// Two kernels, chosen by M:
// * M <= kFusedUpToM (decode-bound, M = 1 is a GEMV; kFusedUpToMWholeYmm /
//   kFusedUpToMWhole512 for rows of whole blocks at the ymm / avx512
//   levels): each thread walks whole weight rows, decodes 16 values at a time
//   (32 for rows of whole blocks, x reordered once to match) straight into
//   registers and feeds up to 4 rows of x from them. The 4-bit weight is
//   read from memory exactly once; there is no intermediate weight buffer.
// * larger M (compute-bound): a thread decodes a tile of kTileN weight rows x
//   kTileK columns into a cache-resident fp32 buffer once, then runs a
//   register-blocked micro-kernel over every row of x, so decode cost is
//   amortised over M: from kOuterTileMinM rows the outer-product tile of
//   panel_gemm.h, below that a 4 x 3 tile of dot products along K. Tile
//   sizes were picked by measuring K = N = 4096 on one core (4 x 3 beat 4 x 2
//   by 25% at M = 32; a 1024-column tile beat 256 and 512, whose extra
//   horizontal sums cost more than the L1 misses the bigger tile adds).
// Blocks of block_size may span rows (K not a multiple of block_size) and rows
// may start on a low nibble (odd K): both kernels walk flat indices and split a
// row into segments of constant scale.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "avx2_reduce.h"
#include "micro_gemm.h"
#include "nf4_kernels.h"
#include "panel_gemm.h"
#include "simd.h"
#include "thread_scratch.h"
#include "work_share.h"

namespace pyquant {
namespace nf4cpu {
namespace {

constexpr int64_t kFusedMaxM = 4;   // rows of x sharing one decode in the fused kernel
constexpr int64_t kRows = 16;       // weight rows per task of the fused kernel (qmatmul_fused)
constexpr int64_t kFusedUpToM = 5;  // above this M the tiled kernel is faster (1 core, K = N = 4096)
// The same at the ymm levels for rows of whole blocks (the byte-plane decode):
// on Zen 3 (4096 x 4096, 1 and 2 threads) the fused kernel ran 1.19-1.78x the
// tiled one at M = 4-8 and 0.84-1.04x at 12-16.
constexpr int64_t kFusedUpToMWholeYmm = 8;
// The same at avx512 (whole_block_rows512): on Zen 5, 1 and 2 threads, the
// fused kernel ran 1.06-1.26x the tiled one at M = 16-24 for K = 576 and
// 4096 (0.80-0.87x at 32), and, since it takes long rows in slices of K,
// 1.09-1.20x at M = 24 for K = 8192 and 11008 (1.56-2.36x at M = 6-12).
constexpr int64_t kFusedUpToMWhole512 = 24;
constexpr int64_t kTileN = 12;      // weight rows per decoded tile (a multiple of kNR)
constexpr int64_t kTileK = 1024;    // columns per decoded tile (12 x 1024 fp32 = 48 KiB, in L2)
constexpr int kMR = kMicroMR, kNR = kMicroNR;  // register tile of the tiled kernel (micro_gemm.h)
// Rows of x per pass of the tiled kernel: every tile sweeps its pass's x
// panel (rows x kTileK fp32, 1 MiB at 256 rows), which must stay in L2. At
// M = 1024 unblocked, 4096 x 4096 ran at 0.82x dense fp32 (2 threads); each
// pass decodes W again, a few per cent of its GEMM.
constexpr int64_t kTiledBlockM = 256;

// ---------------------------------------------------------------- scalar ---

using FusedFn = void (*)(const Weight&, const float*, int64_t, int64_t, int64_t, const float*, float*, int64_t);

// Fused kernels: rows [n0, n1) of W against MR rows of x (row r at x + r * ldx);
// y[r * ldy + n] = dot + bias.
template <int MR>
void fused_rows_scalar(const Weight& w, const float* x, int64_t ldx, int64_t n0, int64_t n1, const float* bias,
                       float* y, int64_t ldy) {
  const int64_t K = w.k;
  const int sh = nf4_log2(w.block_size);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t s = n * K, e = s + K;
    float acc[MR] = {};
    int64_t i = s;
    int64_t b = i >> sh;
    while (i < e) {
      const int64_t seg_end = std::min((b + 1) << sh, e);
      const float sc = w.scales(b);
      for (; i < seg_end; ++i) {
        const float v = nf4_value(nf4_code(w.qweight, i)) * sc;
        for (int r = 0; r < MR; ++r) acc[r] += x[r * ldx + (i - s)] * v;
      }
      ++b;
    }
    const float bv = bias ? bias[n] : 0.0f;
    for (int r = 0; r < MR; ++r) y[r * ldy + n] = acc[r] + bv;
  }
}

// ------------------------------------------------------------------ AVX2 ---
#if PQ_X86

// Rows [n0, n1) of W against MR <= 4 rows of x (xp, rows ldx apart), rows of
// W made of whole blocks (the usual layer): no odd starts or partial
// segments, so none of the general loop's per-block bookkeeping (a quarter
// of its instructions at block size 64), and the byte-plane decode
// (nf4_decode32) with x put in its order once per call. BS > 0 is the block
// size known at compile time, its 32-value steps unrolled. On Zen 3 (1 and 2
// threads) M = 1 ran 1.44-1.53x the general loop with nf4_decode8, 16 values
// a step (4096 x 4096 and 576 x 1536), M = 2-5 1.32-1.46x (4096 x 4096).
template <int BS, int MR>
PQ_TARGET_AVX2 void whole_block_rows(const Weight& w, const float* xp, int64_t ldx, int64_t n0, int64_t n1,
                                     const float* bias, float* y, int64_t ldy) {
  const int64_t K = w.k, bs = BS > 0 ? BS : w.block_size;
  const Nf4ByteLut lut = nf4_byte_lut();
  // Independent FMA chains: two per row of x up to two rows (one row sums a
  // block unscaled and scales it once; more rows scale the decoded values
  // once and share them), one per row above, which with the decode's
  // registers fills the 16 ymm.
  constexpr int S = MR <= 2 ? 2 : 1;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = w.qweight + ((n * K) >> 1);
    int64_t b = (n * K) / bs;
    __m256 acc[MR][S];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < S; ++j) acc[r][j] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += bs, ++b) {
      const __m256 vs = _mm256_set1_ps(w.scales(b));
      if constexpr (MR == 1) {
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
#pragma GCC unroll 4
        for (int64_t k = k0; k < k0 + bs; k += 32) {
          __m256 v[4];
          nf4_decode32(lut, q + (k >> 1), v);
          s0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp + k), v[0], s0);
          s1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp + k + 8), v[1], s1);
          s0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp + k + 16), v[2], s0);
          s1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp + k + 24), v[3], s1);
        }
        acc[0][0] = _mm256_fmadd_ps(s0, vs, acc[0][0]);
        acc[0][1] = _mm256_fmadd_ps(s1, vs, acc[0][1]);
      } else {
#pragma GCC unroll 4
        for (int64_t k = k0; k < k0 + bs; k += 32) {
          __m256 v[4];
          nf4_decode32(lut, q + (k >> 1), v);
          for (int j = 0; j < 4; ++j) {
            const __m256 ws = _mm256_mul_ps(v[j], vs);
            for (int r = 0; r < MR; ++r)
              acc[r][j % S] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + r * ldx + k + 8 * j), ws, acc[r][j % S]);
          }
        }
      }
    }
    const float bv = bias ? bias[n] : 0.0f;
    for (int r = 0; r < MR; ++r) {
      __m256 a = acc[r][0];
      for (int j = 1; j < S; ++j) a = _mm256_add_ps(a, acc[r][j]);
      y[r * ldy + n] = hsum_avx2(a) + bv;
    }
  }
}

// Kernel<BS, MR>::fn for a block size (32, 64 and 128 unrolled, others
// general: BS = 0) and 1-4 rows of x: the ymm and the zmm whole-block kernels.
template <template <int, int> class Kernel>
FusedFn whole_block_pick(int64_t block_size, int mr) {
  auto by_mr = [mr](auto bs) -> FusedFn {
    constexpr int BS = decltype(bs)::value;
    switch (mr) {
      case 1: return Kernel<BS, 1>::fn;
      case 2: return Kernel<BS, 2>::fn;
      case 3: return Kernel<BS, 3>::fn;
      default: return Kernel<BS, 4>::fn;
    }
  };
  switch (block_size) {
    case 32: return by_mr(std::integral_constant<int, 32>{});
    case 64: return by_mr(std::integral_constant<int, 64>{});
    case 128: return by_mr(std::integral_constant<int, 128>{});
    default: return by_mr(std::integral_constant<int, 0>{});
  }
}

template <int BS, int MR>
struct WholeBlockYmm {
  static constexpr FusedFn fn = whole_block_rows<BS, MR>;
};

// count values of x (rows of K % 32 == 0 back to back) into nf4_decode32's
// order, 8 at a time.
PQ_TARGET_AVX2 void to_decode32_order(const float* x, int64_t count, float* xp) {
  const __m256i order = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kNf4Decode32Order));
  for (int64_t i = 0; i < count; i += 8)
    _mm256_storeu_ps(xp + i, _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + i), order));
}

// AVX-512, rows of whole blocks: a code is the index of a vpermps over the
// 16 codebook values in one zmm, already multiplied by the block's scale
// (once per block: each product is then x * fp32(c * s), the reference's
// dequantized weight). vpermps reads an index's low 4 bits, so a byte widened
// to 32 bits is its low nibble's index as it stands and its high nibble's
// shifted right by 4: per 32 values one vpmovzxbd, one shift, two vpermps and
// the FMAs, where the byte-plane decode takes 12 shuffles (x in
// to_even_odd32_order). Four accumulators per row of x: consecutive 32-value
// steps feed independent FMA chains. The weight is prefetched kRows rows on
// (the next chunk of this thread's contiguous range): without it, from a cold
// cache, M = 2 took 1.8x its warm time.
template <int MR>
PQ_TARGET_AVX512 inline void step512(const uint8_t* q, const float* xp, int64_t ldx, int64_t k, __m512 tab,
                                     __m512 (&acc)[MR][4], int j) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (k >> 1))));
  const __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab), odd = _mm512_permutexvar_ps(v, tab);
  for (int r = 0; r < MR; ++r) {
    acc[r][2 * j] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + r * ldx + k), even, acc[r][2 * j]);
    acc[r][2 * j + 1] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + r * ldx + k + 16), odd, acc[r][2 * j + 1]);
  }
}

// Row n's columns [k0, k1) (k0 on a block, k1 on a block or K) into acc,
// prefetching `ahead` bytes on.
template <int BS, int MR>
PQ_TARGET_AVX512 inline void columns512(const Weight& w, const float* xp, int64_t ldx, int64_t n, int64_t k0,
                                        int64_t k1, int64_t ahead, __m512 (&acc)[MR][4]) {
  const int64_t K = w.k, bs = BS > 0 ? BS : w.block_size;
  const __m512 codebook = _mm512_loadu_ps(kNf4Codebook);
  const uint8_t* q = w.qweight + ((n * K) >> 1);
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = k0, b = (n * K + k0) / bs;
  if (bs >= 64) {
    for (; k < k1; k += bs, ++b) {
      const __m512 tab = _mm512_mul_ps(codebook, _mm512_set1_ps(w.scales(b)));
#pragma GCC unroll 2
      for (int64_t j = k; j < k + bs; j += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(q + (j >> 1) + ahead), _MM_HINT_T0);
        step512<MR>(q, xp, ldx, j, tab, acc, 0);
        step512<MR>(q, xp, ldx, j + 32, tab, acc, 1);
      }
    }
  } else {  // blocks of 32: a table per step
    for (; k + 64 <= k1; k += 64, b += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(q + (k >> 1) + ahead), _MM_HINT_T0);
      step512<MR>(q, xp, ldx, k, _mm512_mul_ps(codebook, _mm512_set1_ps(w.scales(b))), acc, 0);
      step512<MR>(q, xp, ldx, k + 32, _mm512_mul_ps(codebook, _mm512_set1_ps(w.scales(b + 1))), acc, 1);
    }
    if (k < k1) step512<MR>(q, xp, ldx, k, _mm512_mul_ps(codebook, _mm512_set1_ps(w.scales(b))), acc, 0);
  }
}

template <int MR>
PQ_TARGET_AVX512 inline __m512 total512(const __m512 (&acc)[MR][4], int r) {
  return _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
}

template <int BS, int MR>
PQ_TARGET_AVX512 void whole_block_rows512(const Weight& w, const float* xp, int64_t ldx, int64_t n0, int64_t n1,
                                          const float* bias, float* y, int64_t ldy) {
  const int64_t K = w.k, bs = BS > 0 ? BS : w.block_size;
  __m512 acc[MR][4];
  const int64_t slice = std::max(kSliceFloats / MR / bs * bs, bs);
  if (K <= slice || n1 - n0 > kRows) {
    for (int64_t n = n0; n < n1; ++n) {
      columns512<BS, MR>(w, xp, ldx, n, 0, K, kRows * (K >> 1), acc);  // the same place in the next chunk of rows
      const float bv = bias ? bias[n] : 0.0f;
      for (int r = 0; r < MR; ++r) y[r * ldy + n] = _mm512_reduce_add_ps(total512<MR>(acc, r)) + bv;
    }
    return;
  }
  // Long rows: the chunk's rows a slice of K at a time (kSliceFloats values of
  // x in all, work_share.h), their partial sums kept between slices, so the
  // slice of x stays in L1 while the rows stream past it. Whole rows at K =
  // 11008 (44 KiB of x a row, the same 48 KiB L1 as the weight's lines) had
  // M = 1 at 1.39x and M = 2 (a pass per row of x) at 1.9x the time of as
  // many bytes in rows of 4096. The prefetch runs kSliceAheadRows rows on.
  __m512 part[kRows][MR];
  for (int64_t k0 = 0; k0 < K; k0 += slice) {
    const int64_t k1 = std::min(K, k0 + slice);
    for (int64_t n = n0; n < n1; ++n) {
      columns512<BS, MR>(w, xp, ldx, n, k0, k1, kSliceAheadRows * (K >> 1), acc);
      for (int r = 0; r < MR; ++r)
        part[n - n0][r] = k0 == 0 ? total512<MR>(acc, r) : _mm512_add_ps(part[n - n0][r], total512<MR>(acc, r));
    }
  }
  for (int64_t n = n0; n < n1; ++n) {
    const float bv = bias ? bias[n] : 0.0f;
    for (int r = 0; r < MR; ++r) y[r * ldy + n] = _mm512_reduce_add_ps(part[n - n0][r]) + bv;
  }
}

template <int BS, int MR>
struct WholeBlockZmm {
  static constexpr FusedFn fn = whole_block_rows512<BS, MR>;
};

// count values of x (rows of K % 32 == 0 back to back) as, per 32, their 16
// even elements then their 16 odd ones (whole_block_rows512's order).
PQ_TARGET_AVX512 void to_even_odd32_order(const float* x, int64_t count, float* xp) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t i = 0; i < count; i += 32) {
    const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
    _mm512_storeu_ps(xp + i, _mm512_permutex2var_ps(a, even, b));
    _mm512_storeu_ps(xp + i + 16, _mm512_permutex2var_ps(a, odd, b));
  }
}

template <int MR>
PQ_TARGET_AVX2 void fused_rows_avx2(const Weight& w, const float* x, int64_t ldx, int64_t n0, int64_t n1,
                                    const float* bias, float* y, int64_t ldy) {
  const int64_t K = w.k;
  const int sh = nf4_log2(w.block_size);
  const Nf4Lut lut = nf4_lut();
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t s = n * K, e = s + K;
    // Two accumulators per x row: consecutive 8-value steps feed independent
    // FMA chains, so M = 1 is not bound by FMA latency.
    __m256 acc0[MR], acc1[MR];
    float tail[MR];
    for (int r = 0; r < MR; ++r) {
      acc0[r] = _mm256_setzero_ps();
      acc1[r] = _mm256_setzero_ps();
      tail[r] = 0.0f;
    }
    int64_t i = s;
    int64_t b = i >> sh;
    while (i < e) {
      const int64_t seg_end = std::min((b + 1) << sh, e);
      const float sc = w.scales(b);
      const __m256 vs = _mm256_set1_ps(sc);
      if (i & 1) {  // the row (odd K) starts on a low nibble
        const float v = nf4_value(nf4_code(w.qweight, i)) * sc;
        for (int r = 0; r < MR; ++r) tail[r] += x[r * ldx + (i - s)] * v;
        ++i;
      }
      if constexpr (MR == 1) {
        // One x row: sum x * code over the segment, scale once at its end
        // (saves a multiply per 8 values).
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        const float* xp = x - s;
        for (; i + 16 <= seg_end; i += 16) {
          s0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp + i), nf4_decode8(lut, w.qweight + (i >> 1)), s0);
          s1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp + i + 8), nf4_decode8(lut, w.qweight + (i >> 1) + 4), s1);
        }
        if (i + 8 <= seg_end) {
          s0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp + i), nf4_decode8(lut, w.qweight + (i >> 1)), s0);
          i += 8;
        }
        acc0[0] = _mm256_fmadd_ps(s0, vs, acc0[0]);
        acc1[0] = _mm256_fmadd_ps(s1, vs, acc1[0]);
      } else {
        // Several x rows: scale the decoded values once, share them.
        for (; i + 16 <= seg_end; i += 16) {
          const __m256 w0 = _mm256_mul_ps(nf4_decode8(lut, w.qweight + (i >> 1)), vs);
          const __m256 w1 = _mm256_mul_ps(nf4_decode8(lut, w.qweight + (i >> 1) + 4), vs);
          const float* xp = x + (i - s);
          for (int r = 0; r < MR; ++r) {
            acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + r * ldx), w0, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + r * ldx + 8), w1, acc1[r]);
          }
        }
        if (i + 8 <= seg_end) {
          const __m256 w0 = _mm256_mul_ps(nf4_decode8(lut, w.qweight + (i >> 1)), vs);
          const float* xp = x + (i - s);
          for (int r = 0; r < MR; ++r) acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + r * ldx), w0, acc0[r]);
          i += 8;
        }
      }
      for (; i < seg_end; ++i) {
        const float v = nf4_value(nf4_code(w.qweight, i)) * sc;
        for (int r = 0; r < MR; ++r) tail[r] += x[r * ldx + (i - s)] * v;
      }
      ++b;
    }
    const float bv = bias ? bias[n] : 0.0f;
    for (int r = 0; r < MR; ++r) y[r * ldy + n] = hsum_avx2(_mm256_add_ps(acc0[r], acc1[r])) + tail[r] + bv;
  }
}

#endif  // PQ_X86

// ------------------------------------------------------------- drivers ---

// The fused kernel for mr rows of x; whole_block_size > 0: rows of W made of
// whole blocks of that size, x in nf4_decode32's order (AVX2 only), or in
// to_even_odd32_order's (avx512).
FusedFn fused_fn(int mr, bool avx2, bool avx512, int64_t whole_block_size) {
#if PQ_X86
  if (avx512 && whole_block_size > 0) return whole_block_pick<WholeBlockZmm>(whole_block_size, mr);
  if (avx2 && whole_block_size > 0) return whole_block_pick<WholeBlockYmm>(whole_block_size, mr);
  if (avx2) {
    switch (mr) {
      case 1: return fused_rows_avx2<1>;
      case 2: return fused_rows_avx2<2>;
      case 3: return fused_rows_avx2<3>;
      default: return fused_rows_avx2<4>;
    }
  }
#endif
  switch (mr) {
    case 1: return fused_rows_scalar<1>;
    case 2: return fused_rows_scalar<2>;
    case 3: return fused_rows_scalar<3>;
    default: return fused_rows_scalar<4>;
  }
}

void qmatmul_fused(const Weight& w, const float* x, int64_t m, const float* bias, const LoraEpilogue& lora, float* y,
                   int nthreads, bool avx2, bool avx512) {
  const int64_t N = w.n, K = w.k;
  // Rows in chunks of 16: a few hundred tasks for real layers, and tiny layers
  // stay on one thread (a parallel region costs microseconds). A chunk's
  // packed rows stay in cache while groups of 4 x rows walk over them.
  // (At the ymm levels, blocking K so the slice of x stays in L1 measured
  // slower: the 16 row streams it interleaves defeat the hardware
  // prefetcher. At avx512 whole_block_rows512 takes long rows in slices, with
  // a software prefetch.)
  const int64_t nchunks = (N + kRows - 1) / kRows;
  const bool parallel = nchunks > 1 && N * K * ((m + kFusedMaxM - 1) / kFusedMaxM) >= (int64_t(1) << 15);
#if PQ_X86
  // Rows of whole blocks: the byte-plane decode, x reordered once.
  const bool whole = avx2 && K % w.block_size == 0;
  const float* xs = x;
  if (whole) {
    float* xp = thread_scratch(m * K, Scratch::kXPanels);
    if (avx512) {
      to_even_odd32_order(x, m * K, xp);
    } else {
      to_decode32_order(x, m * K, xp);
    }
    xs = xp;
  }
#else
  const bool whole = false;
  const float* xs = x;
#endif
  // whole_block_rows512: rows of x a pass as fit in L1 (work_share.h), of
  // its slices of K in long rows
  const int64_t pass_rows = whole && avx512 ? rows_within_l1(std::min(K, kSlicePassK), kFusedMaxM) : kFusedMaxM;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (parallel)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t n0 = c * kRows, n1 = std::min(N, n0 + kRows);
    for (int64_t m0 = 0; m0 < m; m0 += pass_rows) {
      const int64_t mr = std::min(pass_rows, m - m0);
      fused_fn(int(mr), avx2, avx512, whole ? w.block_size : 0)(w, xs + m0 * K, K, n0, n1, bias, y + m0 * N, N);
    }
    lora.apply(y, N, 0, m, n0, n1);
  }
}

void qmatmul_tiled(const Weight& w, const float* x, int64_t m, const float* bias, const LoraEpilogue& lora, float* y,
                   int nthreads, bool avx2) {
  const int64_t N = w.n, K = w.k;
  const Simd level = simd_level();  // read outside the region: it may throw
  const bool avx512 = level >= Simd::kAvx512;
  const int64_t ntiles = (N + kTileN - 1) / kTileN;
  // From kOuterTileMinM rows, the outer-product tile on x repacked once per
  // call, each tile's outputs summed transposed (panel_gemm.h).
  const PanelGemm* outer = avx2 ? panel_gemm_for(level, m) : nullptr;
  float *x_panels = nullptr, *yt_all = nullptr;
  const int64_t ldyt = padded_rows(m);
  if (outer) {
    x_panels = thread_scratch(x_panels_floats(m, K), Scratch::kXPanels);
    yt_all = thread_scratch(nthreads * kTileN * ldyt, Scratch::kYTransposed);
    pack_x_panels(x, K, m, K, K, x_panels, nthreads);
  }
  // Handed out one at a time: on a shared machine a thread that loses its core
  // for a while then holds up one tile, not a fixed half of them.
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (ntiles > 1)
  for (int64_t t = 0; t < ntiles; ++t) {
    alignas(64) float wbuf[kTileN * kTileK];
    const int64_t n0 = t * kTileN;
    const int64_t nc = std::min(kTileN, N - n0);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < nc; ++j) y[r * N + n0 + j] = bias ? bias[n0 + j] : 0.0f;
    float* yt = outer ? yt_all + omp_get_thread_num() * kTileN * ldyt : nullptr;
    if (yt) std::fill(yt, yt + nc * ldyt, 0.0f);
    for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
      const int64_t kc = std::min(kTileK, K - k0);
      for (int64_t j = 0; j < nc; ++j) {
        const int64_t f = (n0 + j) * K + k0;
        if (avx2) {
          decode_range_avx2(w, f, f + kc, wbuf + j * kTileK);
        } else {
          decode_range_scalar(w, f, f + kc, wbuf + j * kTileK);
        }
      }
      if (yt) {
        outer->gemm(x_panels, m, K, k0, kc, wbuf, kTileK, int(nc), yt, ldyt);
        continue;
      }
      for (int64_t m0 = 0; m0 < m; m0 += kMR) {
        const int mr = int(std::min<int64_t>(kMR, m - m0));
        for (int64_t j = 0; j < nc; j += kNR) {
          const int nr = int(std::min<int64_t>(kNR, nc - j));
          micro_gemm_fn(mr, nr, avx2, avx512)(x + m0 * K + k0, K, wbuf + j * kTileK, kTileK, kc, y + m0 * N + n0 + j,
                                              N);
        }
      }
    }
    if (yt) outer->add_transposed(yt, ldyt, int(nc), m, y + n0, N);
    lora.apply(y, N, 0, m, n0, n0 + nc);
  }
}

}  // namespace

void qmatmul(const Weight& w, const float* x, int64_t m, const float* bias, const LoraEpilogue& lora, float* y,
             int nthreads, int path) {
  const bool avx2 = simd_has_avx2();
  const Simd level = simd_level();
  const bool whole = w.k % w.block_size == 0;
  int64_t fused_up_to = kFusedUpToM;
  if (whole && (level == Simd::kAvx2 || level == Simd::kAvxVnni)) fused_up_to = kFusedUpToMWholeYmm;
  if (whole && level >= Simd::kAvx512) fused_up_to = kFusedUpToMWhole512;
  if (path == 0 || (path < 0 && m <= fused_up_to)) {
    qmatmul_fused(w, x, m, bias, lora, y, nthreads, avx2, level >= Simd::kAvx512);
  } else {
    for (int64_t i0 = 0; i0 < m; i0 += kTiledBlockM) {
      LoraEpilogue pass = lora;  // this pass's rows of x
      if (pass.xa) pass.xa += i0 * pass.rank;
      qmatmul_tiled(w, x + i0 * w.k, std::min(kTiledBlockM, m - i0), bias, pass, y + i0 * w.n, nthreads, avx2);
    }
  }
}

}  // namespace nf4cpu
}  // namespace pyquant
