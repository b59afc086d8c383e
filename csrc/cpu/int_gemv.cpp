// Int format, small M (1..kGemvMaxM rows of x): a streaming GEMV.
//
// At small M the work is decoding weights, so the inner loop does as little
// per weight as this core allows (measured on Zen 4: the FP/SIMD pipes retire
// ~2.5-2.8 vector ops per cycle in this mix, so every op per 8 weights counts):
//
// * No scale or zero in the inner loop. Per group the kernel accumulates
//   dot = sum(q * x) and applies the group's scale once; the zero point
//   enters once per row as  sum_g s_g * z_g * sum_{k in g} x_k :
//       sum_k (q - z) * s * x = sum_g s_g * dot_g - sum_g s_g * z_g * X_g
// * No shifts for 4- and 2-bit codes. A 4-bit byte b = lo + 16 * hi feeds two
//   products, lo * x_j + hi * x_{j+16}, which equal
//       lo * (x_j - x_{j+16} / 16) + b * (x_{j+16} / 16)
//   so with x transformed once per call the decode is an AND, not a shift and
//   an AND (2-bit codes use the same telescoping with masks 3, 15, 63, 255).
//
// Both reorder float operations: qmatmul matches the reference to fp32
// tolerance, not bit for bit.
//
// At the avx512 level 4-bit rows take a zmm body (gemv_row_block4_zmm):
// 4096 x 4096, fp32 x, 1.19-1.39x the ymm body at M = 1-8 (2 threads, and
// 1.27-1.39x on one), the same error against fp64 (3-5e-7 relative).
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>

#include "int_kernels.h"
#include "work_share.h"

namespace pyquant {
namespace {

#if PQ_X86
// x (transformed) is read in K blocks of at most 16 KiB (M x block columns of
// fp32) so that it stays in L1 while weight rows stream past.
template <int M>
constexpr int64_t block_chunks() {
  return (M == 1 ? 4096 : M == 2 ? 2048 : 1024) / kIntChunk;
}
constexpr int64_t kRows = 16;  // weight rows per block handed to a thread
// Software prefetch distance of the single-K-block stream (M = 1 at K <= 4096).
// Each thread reads one contiguous range, which the L2 stream prefetcher
// follows only up to the next 4 KiB page (two 4-bit rows at K = 4096); a
// prefetch this far ahead starts each page early. Measured from a cold cache
// (int4 g128, K = N = 4096): 1024..3072 bytes alike, 2 KiB best by a hair;
// it gains 5-10% at 4 bits and nothing at 8 bits, whose faster byte stream
// the hardware prefetcher already keeps up with (there it cost up to 15% on
// one thread), so 8-bit rows get none.
constexpr int64_t kPrefetchAhead = 2048;
constexpr int64_t kMaxBlockGroups = 4096 / kIntChunk;

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using FloatBuf = std::unique_ptr<float[], FreeDeleter>;
FloatBuf alloc_floats(int64_t n) {
  const size_t bytes = size_t((n * 4 + 63) / 64 * 64);
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes ? bytes : 64));
  if (!p) throw std::bad_alloc();  // pybind11 turns it into MemoryError
  return FloatBuf(p);
}

// Codes of one chunk as four int32 vectors that pair with the transformed x
// (see the file comment): 4-bit gives lo(0..7), lo(8..15), b(0..7), b(8..15);
// 2-bit gives b & 3, b & 15, b & 63, b. Other widths are plain codes.
template <int BITS>
PQ_TARGET_AVX2 inline void decode_for_gemv(const uint8_t* c, __m256i v[4]) {
  if constexpr (BITS == 4) {
    const __m256i mask = _mm256_set1_epi32(0xF);
    v[2] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
    v[3] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8)));
    v[0] = _mm256_and_si256(v[2], mask);
    v[1] = _mm256_and_si256(v[3], mask);
  } else if constexpr (BITS == 2) {
    v[3] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
    v[0] = _mm256_and_si256(v[3], _mm256_set1_epi32(3));
    v[1] = _mm256_and_si256(v[3], _mm256_set1_epi32(15));
    v[2] = _mm256_and_si256(v[3], _mm256_set1_epi32(63));
  } else {
    int_decode_chunk_avx2<BITS>(c, v);
  }
}

// One 32-column chunk of x as fp32 (columns past K read as 0).
PQ_TARGET_AVX2 inline void load_x_chunk(const void* x, int dtype, int64_t i0, int64_t valid, __m256 a[4]) {
  if (valid >= kIntChunk) {
    for (int t = 0; t < 4; ++t) a[t] = load8_avx2(x, i0 + 8 * t, dtype);
  } else {
    alignas(32) float tmp[kIntChunk] = {};
    for (int64_t j = 0; j < valid; ++j) tmp[j] = load_float(x, i0 + j, dtype);
    for (int t = 0; t < 4; ++t) a[t] = _mm256_load_ps(tmp + 8 * t);
  }
}

// Transformed x (the values decode_for_gemv's vectors multiply, see the file
// comment), K-block major so that each block's M rows are contiguous, and
// X[i][g] = sum of x over group g (the whole row when per channel).
template <int BITS, int M>
PQ_TARGET_AVX2 void prepare_x(const void* x, int dtype, int64_t ldx, const IntWeight& w, float* xt, float* X,
                              int64_t ldX) {
  constexpr int64_t kbc = block_chunks<M>(), bcols = kbc * kIntChunk;
  const int64_t cpg = w.chunks_per_group;
  for (int i = 0; i < M; ++i) {
    for (int64_t g = 0; g < ldX; ++g) X[i * ldX + g] = 0.0f;
    for (int64_t c = 0; c < w.chunks; ++c) {
      __m256 a[4];
      load_x_chunk(x, dtype, i * ldx + c * kIntChunk, w.k - c * kIntChunk, a);
      const int64_t b = c / kbc;
      float* o = xt + (b * M + i) * bcols + (c - b * kbc) * kIntChunk;
      __m256 v[4];
      if constexpr (BITS == 4) {
        const __m256 r16 = _mm256_set1_ps(0.0625f);
        v[0] = _mm256_fnmadd_ps(a[2], r16, a[0]);
        v[1] = _mm256_fnmadd_ps(a[3], r16, a[1]);
        v[2] = _mm256_mul_ps(a[2], r16);
        v[3] = _mm256_mul_ps(a[3], r16);
      } else if constexpr (BITS == 2) {
        const __m256 q1 = _mm256_set1_ps(0.25f), q2 = _mm256_set1_ps(0.0625f), q3 = _mm256_set1_ps(0.015625f);
        v[0] = _mm256_fnmadd_ps(a[1], q1, a[0]);
        v[1] = _mm256_fnmadd_ps(a[2], q2, _mm256_mul_ps(a[1], q1));
        v[2] = _mm256_fnmadd_ps(a[3], q3, _mm256_mul_ps(a[2], q2));
        v[3] = _mm256_mul_ps(a[3], q3);
      } else {
        for (int t = 0; t < 4; ++t) v[t] = a[t];
      }
      for (int t = 0; t < 4; ++t) _mm256_store_ps(o + 8 * t, v[t]);
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
      X[i * ldX + c / cpg] += hsum_avx2(sum);
    }
  }
}

// The segments of chunks [kb0, kb1) of a row: one per group, or the whole
// block when per channel.
struct Segments {
  bool per_channel;
  int64_t segc, nseg, g0;
  Segments(const IntWeight& w, int64_t kb0, int64_t kb1)
      : per_channel(w.group_size < 0),
        segc(per_channel ? kb1 - kb0 : w.chunks_per_group),
        nseg((kb1 - kb0 + segc - 1) / segc),
        g0(per_channel ? 0 : kb0 / segc) {}
};

// block_scales' last 1-7 groups of a row (all of a row's five at K = 576, g128)
// as one vector, not a scalar loop: the loop (two conversions, a multiply and an
// update of out per group) took about a quarter of a 1536 x 576 GEMV (M = 1,
// one thread). Not inlined: in block_scales itself it slowed the 4096-wide rows,
// which never take it, by 15% at M = 4 (code placement; Zen 3).
template <int M>
PQ_TARGET_AVX2 __attribute__((noinline)) void block_scales_tail(const float* X, int64_t ldX, const IntWeight& w,
                                                                int64_t sbase, int64_t g0, int64_t g, int64_t rest,
                                                                float* sf, __m256* zt) {
  const int64_t total = w.n * w.groups;
  const __m256 s = load_upto8_avx2(w.scales, sbase + g, rest, total, w.scale_dtype);
  const __m256 z = w.zeros ? load_upto8_avx2(w.zeros, sbase + g, rest, total, w.scale_dtype)
                           : _mm256_set1_ps(float(1 << (w.bits - 1)));
  _mm256_store_ps(sf + g, s);
  const __m256 sz = _mm256_mul_ps(s, z);  // 0 past the block's groups
  // X past them is this row's later groups or the next row's: masked to 0 too
  // (an Inf in another row of x times the 0 of sz would be NaN here)
  const __m256 live = _mm256_castsi256_ps(lanes_below_avx2(rest));
  for (int i = 0; i < M; ++i)
    zt[i] = _mm256_fmadd_ps(sz, _mm256_and_ps(_mm256_loadu_ps(X + i * ldX + g0 + g), live), zt[i]);
}

// This block's scales of row n as fp32 (sf), and its share of the
// zero-point term sum_g s_g * z_g * X[i][g] taken off out (a per-channel
// row's single group is counted with the first block).
template <int M>
PQ_TARGET_AVX2 void block_scales(const float* X, int64_t ldX, const IntWeight& w, int64_t n, int64_t kb0,
                                 const Segments& sg, float* sf, float* out) {
  const int64_t sbase = n * w.groups + sg.g0, nsc = sg.per_channel ? 1 : sg.nseg;
  const bool with_zero = !sg.per_channel || kb0 == 0;
  const __m256 zsym = _mm256_set1_ps(float(1 << (w.bits - 1)));
  __m256 zt[M];
  for (int i = 0; i < M; ++i) zt[i] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= nsc; g += 8) {
    const __m256 s = load8_avx2(w.scales, sbase + g, w.scale_dtype);
    _mm256_store_ps(sf + g, s);
    const __m256 sz = _mm256_mul_ps(s, w.zeros ? load8_avx2(w.zeros, sbase + g, w.scale_dtype) : zsym);
    for (int i = 0; i < M; ++i) zt[i] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(X + i * ldX + sg.g0 + g), zt[i]);
  }
  const int64_t rest = nsc - g;
  if (rest > 0 && !sg.per_channel) {
    block_scales_tail<M>(X, ldX, w, sbase, sg.g0, g, rest, sf, zt);
  } else if (rest > 0) {  // per channel: the row's one scale
    sf[0] = load_float_avx2(w.scales, sbase, w.scale_dtype);
    if (with_zero) {
      const float sz = sf[0] * zero_avx2(w, n, sg.g0);
      for (int i = 0; i < M; ++i) out[i] -= sz * X[i * ldX + sg.g0];
    }
  }
  for (int i = 0; i < M; ++i) out[i] -= hsum_avx2(zt[i]);
}

// What both row-block bodies start from: the segments, the scales (the
// zero-point share already taken off out), the row and its prefetch span
// (indexed like the row; null for none).
template <int M>
struct RowBlock {
  Segments sg;
  alignas(32) float sf[kMaxBlockGroups + 8];
  const uint8_t* row;
  const uint8_t* pfc;
  PQ_TARGET_AVX2 RowBlock(const float* X, int64_t ldX, const IntWeight& w, int64_t n, int64_t kb0, int64_t kb1,
                          const uint8_t* pf, int cb, float* out)
      : sg(w, kb0, kb1), row(w.qweight + n * w.row_bytes), pfc(pf ? pf - kb0 * cb : nullptr) {
    block_scales<M>(X, ldX, w, n, kb0, sg, sf, out);
  }
};

// Adds, for row n and chunks [kb0, kb1), sum over the segments of
// s_seg * sum(q * xt) minus the zero-point term of the block's groups, for
// each of the M rows of x, to out. pf (or null) is the weight span to fetch
// into L1 meanwhile, as long as this one: one prefetch per cache line,
// spread through the loop so that the requests overlap the arithmetic
// instead of queueing up in a burst (a whole row ahead at once measured
// 10-20% slower from a cold cache).
template <int BITS, int M>
PQ_TARGET_AVX2 void gemv_row_block(const float* xt, int64_t ldx, const float* X, int64_t ldX, const IntWeight& w,
                                   int64_t n, int64_t kb0, int64_t kb1, const uint8_t* pf, float* out) {
  constexpr int cb = kIntChunk * BITS / 8;
  // Independent accumulator chains: a chain takes one FMA per 4-cycle FMA
  // latency, so several must be in flight to keep both FMA pipes busy; the
  // per-group reset also lets the core overlap one group's chains with the
  // next. Measured best: 4 per row of x for M <= 3, 2 for M = 4 (16 ymm
  // registers); 8 for M = 1 costs more in the per-group reduction than it
  // gains.
  constexpr int S = M <= 3 ? 4 : 2;
  const RowBlock<M> rb(X, ldX, w, n, kb0, kb1, pf, cb, out);
  const bool per_channel = rb.sg.per_channel;
  const int64_t segc = rb.sg.segc, nseg = rb.sg.nseg;
  const float* sf = rb.sf;
  const uint8_t *row = rb.row, *pfc = rb.pfc;
  __m256 tot[M];
  for (int i = 0; i < M; ++i) tot[i] = _mm256_setzero_ps();
  for (int64_t sg = 0; sg < nseg; ++sg) {
    const int64_t c0 = kb0 + sg * segc, c1 = std::min(c0 + segc, kb1);
    __m256 acc[M][S];
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < S; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int64_t c = c0; c < c1; ++c) {
      // the first chunk that starts in each 64-byte line (3-bit chunks are 12 bytes)
      if (pfc && ((c * cb) & 63) < cb) _mm_prefetch(reinterpret_cast<const char*>(pfc + c * cb), _MM_HINT_T0);
      __m256i q[4];
      decode_for_gemv<BITS>(row + c * cb, q);
      const float* xc = xt + (c - kb0) * kIntChunk;
      for (int t = 0; t < 4; ++t) {
        const __m256 wf = _mm256_cvtepi32_ps(q[t]);
        for (int i = 0; i < M; ++i) {
          acc[i][t % S] = _mm256_fmadd_ps(wf, _mm256_load_ps(xc + i * ldx + 8 * t), acc[i][t % S]);
        }
      }
    }
    const __m256 sv = _mm256_broadcast_ss(sf + (per_channel ? 0 : sg));
    for (int i = 0; i < M; ++i) {
      __m256 a = acc[i][0];
      for (int j = 1; j < S; ++j) a = _mm256_add_ps(a, acc[i][j]);
      tot[i] = _mm256_fmadd_ps(sv, a, tot[i]);
    }
  }
  for (int i = 0; i < M; ++i) out[i] += hsum_avx2(tot[i]);
}

// gemv_row_block for two weight rows against one row of x (4-bit codes, the
// ymm levels). One row's four accumulator chains take one FMA per chunk
// each, so at M = 1 the FMA latency, not the pipes, set the pace; a second
// row's chains fill the gaps and share the loads of x. Old against new in
// one process (Zen 3, one and two threads): 1.07-1.09x at 576 x 1536, 1.03-1.09x
// at 4096 x 4096, 0.99-1.01x at K = 576 (five groups a row: there the
// scales' set-up, block_scales_tail, was the cost). Each row's sums are
// those of gemv_row_block<4, 1>, in the same order: the results are the same
// bit for bit.
PQ_TARGET_AVX2 void gemv_row_pair4(const float* xt, const float* X, int64_t ldX, const IntWeight& w, int64_t n,
                                   int64_t kb0, int64_t kb1, const uint8_t* pf0, const uint8_t* pf1, float* out0,
                                   float* out1) {
  constexpr int cb = kIntChunk / 2;
  const RowBlock<1> ra(X, ldX, w, n, kb0, kb1, pf0, cb, out0), rb(X, ldX, w, n + 1, kb0, kb1, pf1, cb, out1);
  const bool per_channel = ra.sg.per_channel;
  const int64_t segc = ra.sg.segc, nseg = ra.sg.nseg;
  __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
  for (int64_t sg = 0; sg < nseg; ++sg) {
    const int64_t c0 = kb0 + sg * segc, c1 = std::min(c0 + segc, kb1);
    __m256 a0[4], a1[4];
    for (int t = 0; t < 4; ++t) a0[t] = a1[t] = _mm256_setzero_ps();
    for (int64_t c = c0; c < c1; ++c) {
      if (ra.pfc && ((c * cb) & 63) < cb) {
        _mm_prefetch(reinterpret_cast<const char*>(ra.pfc + c * cb), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(rb.pfc + c * cb), _MM_HINT_T0);
      }
      __m256i q0[4], q1[4];
      decode_for_gemv<4>(ra.row + c * cb, q0);
      decode_for_gemv<4>(rb.row + c * cb, q1);
      const float* xc = xt + (c - kb0) * kIntChunk;
      for (int t = 0; t < 4; ++t) {
        const __m256 xv = _mm256_load_ps(xc + 8 * t);
        a0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q0[t]), xv, a0[t]);
        a1[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1[t]), xv, a1[t]);
      }
    }
    const int64_t si = per_channel ? 0 : sg;
    const __m256 s0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0[0], a0[1]), a0[2]), a0[3]);
    const __m256 s1 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a1[0], a1[1]), a1[2]), a1[3]);
    tot0 = _mm256_fmadd_ps(_mm256_broadcast_ss(ra.sf + si), s0, tot0);
    tot1 = _mm256_fmadd_ps(_mm256_broadcast_ss(rb.sf + si), s1, tot1);
  }
  out0[0] += hsum_avx2(tot0);
  out1[0] += hsum_avx2(tot1);
}

// One 4-bit chunk c into accumulators chain and chain + 1 of each row of x.
template <int M>
PQ_TARGET_AVX512 inline void chunk4_zmm(const uint8_t* row, int64_t c, const float* xc, int64_t ldx,
                                        const uint8_t* pfc, __m512 (&acc)[M][4], int chain) {
  constexpr int cb = kIntChunk / 2;
  if (pfc && ((c * cb) & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(pfc + c * cb), _MM_HINT_T0);
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * cb)));
  const __m512 wl = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0xF))), wb = _mm512_cvtepi32_ps(b);
  for (int i = 0; i < M; ++i) {
    acc[i][chain] = _mm512_fmadd_ps(wl, _mm512_load_ps(xc + i * ldx), acc[i][chain]);
    acc[i][chain + 1] = _mm512_fmadd_ps(wb, _mm512_load_ps(xc + i * ldx + 16), acc[i][chain + 1]);
  }
}

// gemv_row_block for 4-bit codes at the avx512 level: a chunk's 16 bytes b
// widen to one zmm of int32, so its 32 products are two FMAs (lo = b & 15
// against xt[0..15], b against xt[16..31]) where the ymm kernel takes four
// and twice the conversions. Two chains per row of x, each over every other
// chunk, keep the FMA pipes fed at M = 1.
template <int M>
PQ_TARGET_AVX512 void gemv_row_block4_zmm(const float* xt, int64_t ldx, const float* X, int64_t ldX,
                                          const IntWeight& w, int64_t n, int64_t kb0, int64_t kb1, const uint8_t* pf,
                                          float* out) {
  const RowBlock<M> rb(X, ldX, w, n, kb0, kb1, pf, kIntChunk / 2, out);
  const uint8_t *row = rb.row, *pfc = rb.pfc;
  __m512 tot[M];
  for (int i = 0; i < M; ++i) tot[i] = _mm512_setzero_ps();
  for (int64_t sg = 0; sg < rb.sg.nseg; ++sg) {
    const int64_t c0 = kb0 + sg * rb.sg.segc, c1 = std::min(c0 + rb.sg.segc, kb1);
    __m512 acc[M][4];
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
    int64_t c = c0;
    for (; c + 2 <= c1; c += 2) {
      chunk4_zmm<M>(row, c, xt + (c - kb0) * kIntChunk, ldx, pfc, acc, 0);
      chunk4_zmm<M>(row, c + 1, xt + (c + 1 - kb0) * kIntChunk, ldx, pfc, acc, 2);
    }
    if (c < c1) chunk4_zmm<M>(row, c, xt + (c - kb0) * kIntChunk, ldx, pfc, acc, 0);
    const __m512 sv = _mm512_set1_ps(rb.sf[rb.sg.per_channel ? 0 : sg]);
    for (int i = 0; i < M; ++i) {
      const __m512 a = _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3]));
      tot[i] = _mm512_fmadd_ps(sv, a, tot[i]);
    }
  }
  for (int i = 0; i < M; ++i) out[i] += _mm512_reduce_add_ps(tot[i]);
}

template <int BITS>
PQ_TARGET_AVX2 inline void prefetch_span(const IntWeight& w, int64_t n, int64_t c0, int64_t c1) {
  constexpr int cb = kIntChunk * BITS / 8;
  const char* p = reinterpret_cast<const char*>(w.qweight + n * w.row_bytes + c0 * cb);
  for (int64_t b = 0; b < (c1 - c0) * cb; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

// Rows [n0, n1) of y. xt holds every K block of transformed x back to back:
// block b is M x (block columns) at xt + b * M * block columns.
template <int BITS, int M>
PQ_TARGET_AVX2 void gemv_rows(const float* xt, const float* X, int64_t ldX, const IntWeight& w, const float* bias,
                              const LoraEpilogue& lora, float* y, int64_t n0, int64_t n1, bool zmm) {
  constexpr int64_t kbc = block_chunks<M>(), ldx = kbc * kIntChunk;
  const int64_t nch = w.chunks;
  const bool blocked = nch > kbc;
  const int rows = int(n1 - n0);
  float out[kRows][M] = {};
  for (int64_t kb0 = 0, b = 0; kb0 < nch; kb0 += kbc, ++b) {
    const int64_t kb1 = std::min(kb0 + kbc, nch);
    const float* xb = xt + b * M * ldx;
    for (int r = 0; r < rows; ++r) {
      const bool pair = BITS == 4 && M == 1 && !zmm && r + 1 < rows;
      // With several K blocks per row, consecutive reads jump by a row
      // stride, which the hardware prefetcher does not follow: fetch the
      // row after next (or, at the last rows, the first rows of the next K
      // block) at once. Spreading those requests through the row instead
      // (as below) was ~10% faster from a cold cache at M = 2 but 20% slower
      // warm (1 thread). With one block the rows stream front to back and
      // the kernel prefetches a fixed distance ahead in the loop.
      const uint8_t* pf = nullptr;
      if (blocked) {
        for (int j = r + 2; j < r + 2 + (pair ? 2 : 1); ++j) {
          if (j < rows) {
            prefetch_span<BITS>(w, n0 + j, kb0, kb1);
          } else if (kb1 < nch) {
            prefetch_span<BITS>(w, n0 + j - rows, kb1, std::min(kb1 + kbc, nch));
          }
        }
      } else if (BITS <= 4) {
        pf = w.qweight + (n0 + r) * w.row_bytes + kPrefetchAhead;
      }
      if (pair) {
        gemv_row_pair4(xb, X, ldX, w, n0 + r, kb0, kb1, pf, pf ? pf + w.row_bytes : nullptr, out[r], out[r + 1]);
        ++r;
      } else if (BITS == 4 && zmm) {
        gemv_row_block4_zmm<M>(xb, ldx, X, ldX, w, n0 + r, kb0, kb1, pf, out[r]);
      } else {
        gemv_row_block<BITS, M>(xb, ldx, X, ldX, w, n0 + r, kb0, kb1, pf, out[r]);
      }
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < M; ++i) y[i * w.n + n0 + r] = bias ? out[r][i] + bias[n0 + r] : out[r][i];
  lora.apply(y, w.n, 0, M, n0, n1);
}

template <int BITS, int M>
void gemv(const void* x, int xdtype, int64_t ldx, const IntWeight& w, const float* bias, const LoraEpilogue& lora,
          float* y, int nthreads) {
  constexpr int64_t kbc = block_chunks<M>(), bcols = kbc * kIntChunk;
  const int64_t nblocks = (w.chunks + kbc - 1) / kbc;
  const int64_t ldX = (w.groups + 7) / 8 * 8;
  FloatBuf xt = alloc_floats(nblocks * M * bcols);
  // + 8: block_scales reads X eight groups at a time, masked, from a group that
  // may lie within eight of the end
  FloatBuf X = alloc_floats(M * ldX + 8);
  prepare_x<BITS, M>(x, xdtype, ldx, w, xt.get(), X.get(), ldX);
  std::fill(X.get() + M * ldX, X.get() + M * ldX + 8, 0.0f);
  const bool zmm = simd_level() == Simd::kAvx512;  // read here: never inside the parallel region
  // Each thread streams one contiguous range of rows, front to back, and
  // when done takes blocks from the back of the others' ranges, so that on a
  // shared machine a descheduled thread still delays only the block it is on.
  // Handing out single blocks in turn (dynamic, 1) instead interleaves the
  // threads 32 KiB apart: from a cold cache that ran at 13-15 GB/s against
  // 19-22 GB/s here (2 threads, int4 K = N = 4096, the same as torch's int4
  // kernel, which splits N the same way); warm, the two are alike.
  parallel_shared(nthreads, (w.n + kRows - 1) / kRows, [&](int64_t b) {
    const int64_t n0 = b * kRows;
    gemv_rows<BITS, M>(xt.get(), X.get(), ldX, w, bias, lora, y, n0, std::min(w.n, n0 + kRows), zmm);
  });
}

template <int BITS>
void gemv_dispatch_m(const void* x, int xdtype, int64_t ldx, int64_t m, const IntWeight& w, const float* bias,
                     const LoraEpilogue& lora, float* y, int nthreads) {
  switch (m) {
    case 1: return gemv<BITS, 1>(x, xdtype, ldx, w, bias, lora, y, nthreads);
    case 2: return gemv<BITS, 2>(x, xdtype, ldx, w, bias, lora, y, nthreads);
    case 3: return gemv<BITS, 3>(x, xdtype, ldx, w, bias, lora, y, nthreads);
    default: return gemv<BITS, 4>(x, xdtype, ldx, w, bias, lora, y, nthreads);
  }
}
#endif

}  // namespace

void int_gemv_avx2(const void* x, int xdtype, int64_t ldx, int64_t m, const IntWeight& w, const float* bias,
                   const LoraEpilogue& lora, float* y, int nthreads) {
#if PQ_X86
  PQ_BITS_SWITCH(w.bits, kBits, "int_gemv_avx2",
                 [&] { gemv_dispatch_m<kBits>(x, xdtype, ldx, m, w, bias, lora, y, nthreads); });
#endif
}

}  // namespace pyquant
