// Int4 with fp32 x at small M, on AVX-512: the codes as indices of a table
// of the group's 16 dequantized values.
//
// Per group and weight row the table is (q - z) * s for q = 0..15, computed
// as the reference dequantizes (fp32 subtract, then multiply), so every
// product is x * W_hat[n, k] with the reference's own W_hat, and no
// zero-point term or per-group sum is left for afterwards. vpermps reads an
// index's low 4 bits: a code byte widened to 32 bits (vpmovzxbd) is its low
// nibble's index as it stands and, shifted right by 4, its high nibble's.
// Per 32 codes and row of x: one vpmovzxbd, one shift, two vpermps, two FMAs
// (the xt kernel of int_gemv.cpp also converts twice and closes every group
// with a reduction and an FMA, about as many instructions again at g128).
// A chunk's byte j holds code j in its low nibble and code j + 16 in its
// high one, so x is read in its natural order.
//
// Threads take blocks of kRows weight rows (work_share.h); rows of x go in
// passes of at most as many as keep 4096 floats each within 48 KiB (L1D on
// Zen 4/5), at most four, and the weight is prefetched kRows rows ahead. Long
// rows go a slice of groups at a time (rows below).
#include <algorithm>

#include "int_kernels.h"
#include "work_share.h"

namespace pyquant {

#if PQ_X86
namespace {

constexpr int64_t kRows = 16;
constexpr int64_t kMaxPassRows = 4;

template <int MR>
PQ_TARGET_AVX512 inline void chunk(const uint8_t* row, const float* x, int64_t ldx, int64_t c, __m512 tab,
                                   __m512 (&acc)[MR][4], int j) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 16)));
  const __m512 lo = _mm512_permutexvar_ps(v, tab), hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab);
  for (int r = 0; r < MR; ++r) {
    acc[r][2 * j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * ldx + c * kIntChunk), lo, acc[r][2 * j]);
    acc[r][2 * j + 1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * ldx + c * kIntChunk + 16), hi, acc[r][2 * j + 1]);
  }
}

// Groups [g0, g1) of weight row n against MR rows of x (rows ldx apart) into
// acc, prefetching `ahead` bytes on (kWholeRow: all of them, g0 = 0 known to
// the compiler: with it a runtime value, g128 at M = 1 ran 0.95x). CPG > 0:
// the chunks per group known at compile time (its pairs unrolled: a loop of
// two trips per g128 group cost as much as the group's products).
template <int CPG, int MR, bool kWholeRow>
PQ_TARGET_AVX512 __attribute__((always_inline)) inline void groups(const float* x, int64_t ldx, const IntWeight& w,
                                                                   int64_t n, int64_t g0_, int64_t g1_, int64_t ahead,
                                                                   __m512 (&acc)[MR][4]) {
  const int64_t g0 = kWholeRow ? 0 : g0_, g1 = kWholeRow ? w.groups : g1_;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t cpg = CPG > 0 ? CPG : w.chunks_per_group;
  const uint8_t* row = w.qweight + n * w.row_bytes;
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t c = g0 * cpg;
  // Scales and zeros 16 groups at a time, converted in vectors, so that a
  // group's table is a subtract and a multiply with broadcast operands
  // (with two scalar conversions per group, Int4 g128 took 1.33x the
  // per-channel time at 4096 x 4096).
  alignas(64) float sf[16], zf[16];
  for (int64_t g = g0; g < g1; ++g) {
    const uint64_t i = uint64_t(g - g0) % 16;
    if (i == 0) {
      const int64_t count = w.groups - g;
      _mm512_store_ps(sf, load16_avx512(w.scales, n * w.groups + g, count, w.scale_dtype));
      _mm512_store_ps(zf, w.zeros ? load16_avx512(w.zeros, n * w.groups + g, count, w.scale_dtype)
                                  : _mm512_set1_ps(8.0f));
    }
    const __m512 tab = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(zf[i])), _mm512_set1_ps(sf[i]));
    const int64_t end = std::min(w.chunks, c + cpg);
#pragma GCC unroll 4
    for (; c + 2 <= end; c += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(row + c * 16 + ahead), _MM_HINT_T0);
      chunk<MR>(row, x, ldx, c, tab, acc, 0);
      chunk<MR>(row, x, ldx, c + 1, tab, acc, 1);
    }
    if (c < end) chunk<MR>(row, x, ldx, c++, tab, acc, 0);
  }
}

template <int MR>
PQ_TARGET_AVX512 inline __m512 total(const __m512 (&acc)[MR][4], int r) {
  return _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
}

// Long rows (their x past kSliceFloats): the block's rows a slice of groups
// at a time, partial sums kept between slices, so the slice of x stays in L1
// while the rows stream past (as NF4's whole_block_rows512; the prefetch runs
// 8 rows on, read 8 rows' slices later). Whole rows at K = 11008 took M = 1-8
// at 1.28-1.75x the time of as many bytes in rows of 4096. A function of its
// own: inside rows() it slowed the whole-row loop (g128 M = 1 0.92-0.95x).
template <int CPG, int MR>
PQ_TARGET_AVX512 __attribute__((noinline)) void rows_sliced(const float* x, int64_t ldx, const IntWeight& w,
                                                             const float* bias, int64_t n0, int64_t n1, int64_t slice,
                                                             float* y) {
  __m512 acc[MR][4], part[kRows][MR];
  for (int64_t g0 = 0; g0 < w.groups; g0 += slice) {
    const int64_t g1 = std::min(w.groups, g0 + slice);
    for (int64_t n = n0; n < n1; ++n) {
      groups<CPG, MR, false>(x, ldx, w, n, g0, g1, kSliceAheadRows * w.row_bytes, acc);
      for (int r = 0; r < MR; ++r)
        part[n - n0][r] = g0 == 0 ? total<MR>(acc, r) : _mm512_add_ps(part[n - n0][r], total<MR>(acc, r));
    }
  }
  for (int64_t n = n0; n < n1; ++n)
    for (int r = 0; r < MR; ++r) {
      const float v = _mm512_reduce_add_ps(part[n - n0][r]);
      y[r * w.n + n] = bias ? v + bias[n] : v;
    }
}

// y[r, n] for rows [n0, n1) of W (at most kRows) and MR rows of x.
template <int CPG, int MR>
PQ_TARGET_AVX512 void rows(const float* x, int64_t ldx, const IntWeight& w, const float* bias, int64_t n0, int64_t n1,
                           float* y) {
  const int64_t slice = w.groups > 1 ? std::max<int64_t>(1, kSliceFloats / MR / (w.chunks_per_group * kIntChunk)) : 1;
  if (w.groups > slice) return rows_sliced<CPG, MR>(x, ldx, w, bias, n0, n1, slice, y);
  __m512 acc[MR][4];
  for (int64_t n = n0; n < n1; ++n) {
    groups<CPG, MR, true>(x, ldx, w, n, 0, w.groups, kRows * w.row_bytes, acc);  // the next block of rows
    for (int r = 0; r < MR; ++r) {
      const float v = _mm512_reduce_add_ps(total<MR>(acc, r));
      y[r * w.n + n] = bias ? v + bias[n] : v;
    }
  }
}

using RowsFn = void (*)(const float*, int64_t, const IntWeight&, const float*, int64_t, int64_t, float*);
template <int CPG>
RowsFn rows_fn(int64_t mr) {
  switch (mr) {
    case 1: return rows<CPG, 1>;
    case 2: return rows<CPG, 2>;
    case 3: return rows<CPG, 3>;
    default: return rows<CPG, 4>;
  }
}
RowsFn rows_fn(int64_t cpg, int64_t mr) {
  switch (cpg) {
    case 2: return rows_fn<2>(mr);
    case 4: return rows_fn<4>(mr);
    case 8: return rows_fn<8>(mr);
    default: return rows_fn<0>(mr);
  }
}

}  // namespace

bool int4_table_supported(const IntWeight& w) {
  return w.bits == 4 && w.k % kIntChunk == 0 && simd_level() >= Simd::kAvx512;
}

void int4_table_qmatmul(const float* x, int64_t m, const IntWeight& w, const float* bias, const LoraEpilogue& lora,
                        float* y, int nthreads) {
  // Passes of near-equal rows (M = 4 at K = 4096: 2 + 2, not 3 + 1).
  const int64_t most = rows_within_l1(std::min(w.k, kSlicePassK), kMaxPassRows), passes = (m + most - 1) / most;
  const int64_t pass = (m + passes - 1) / passes;
  parallel_shared(nthreads, (w.n + kRows - 1) / kRows, [&](int64_t b) {
    const int64_t n0 = b * kRows, n1 = std::min(w.n, n0 + kRows);
    for (int64_t i0 = 0; i0 < m; i0 += pass) {
      const int64_t mr = std::min(pass, m - i0);
      rows_fn(w.groups > 1 ? w.chunks_per_group : 0, mr)(x + i0 * w.k, w.k, w, bias, n0, n1, y + i0 * w.n);
    }
    lora.apply(y, w.n, 0, m, n0, n1);
  });
}

#else
bool int4_table_supported(const IntWeight&) { return false; }
void int4_table_qmatmul(const float*, int64_t, const IntWeight&, const float*, const LoraEpilogue&, float*, int) {}
#endif

}  // namespace pyquant
