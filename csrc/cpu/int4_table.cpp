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
// passes of at most as many as keep their K floats within 48 KiB (L1D on
// Zen 4/5), at most four, and the weight is prefetched kRows rows ahead.
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

// y[r, n] for rows [n0, n1) of W and MR rows of x (rows ldx apart). CPG > 0:
// the chunks per group known at compile time (its pairs unrolled: a loop of
// two trips per g128 group cost as much as the group's products).
template <int CPG, int MR>
PQ_TARGET_AVX512 void rows(const float* x, int64_t ldx, const IntWeight& w, const float* bias, int64_t n0, int64_t n1,
                           float* y) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t cpg = CPG > 0 ? CPG : w.chunks_per_group, ahead = kRows * w.row_bytes;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.qweight + n * w.row_bytes;
    __m512 acc[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
    int64_t c = 0;
    // Scales and zeros 16 groups at a time, converted in vectors, so that a
    // group's table is a subtract and a multiply with broadcast operands
    // (with two scalar conversions per group, Int4 g128 took 1.33x the
    // per-channel time at 4096 x 4096).
    alignas(64) float sf[16], zf[16];
    for (int64_t g = 0; g < w.groups; ++g) {
      if (g % 16 == 0) {
        const int64_t count = w.groups - g;
        _mm512_store_ps(sf, load16_avx512(w.scales, n * w.groups + g, count, w.scale_dtype));
        _mm512_store_ps(zf, w.zeros ? load16_avx512(w.zeros, n * w.groups + g, count, w.scale_dtype)
                                    : _mm512_set1_ps(8.0f));
      }
      const __m512 tab = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(zf[g % 16])), _mm512_set1_ps(sf[g % 16]));
      const int64_t end = std::min(w.chunks, c + cpg);
#pragma GCC unroll 4
      for (; c + 2 <= end; c += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(row + c * 16 + ahead), _MM_HINT_T0);
        chunk<MR>(row, x, ldx, c, tab, acc, 0);
        chunk<MR>(row, x, ldx, c + 1, tab, acc, 1);
      }
      if (c < end) chunk<MR>(row, x, ldx, c++, tab, acc, 0);
    }
    for (int r = 0; r < MR; ++r) {
      const float v = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                                         _mm512_add_ps(acc[r][2], acc[r][3])));
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
  const int64_t most = rows_within_l1(w.k, kMaxPassRows), passes = (m + most - 1) / most;
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
