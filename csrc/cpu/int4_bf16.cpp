// Int4 with bf16 activations at small M, on AVX512-BF16 (vdpbf16ps).
//
// vdpbf16ps multiplies 32 pairs of bf16 values per instruction and adds them
// to 16 fp32 lanes: twice the products of an fp32 FMA, and with bf16 x
// against the integer codes every product is exact (8-bit by 8-bit
// significands fit fp32's 24; the instruction treats denormal inputs as
// zero). So for bf16 x it computes x @ W_hat.T with exact products and fp32
// sums (the error below), not an approximation of x like the int8 planes,
// and it does less per weight than either: per 128 codes and row of x, 4
// vdpbf16ps (in two chains), an add and one FMA for the group's scale, where
// the two-plane int8 kernel needs 4 vpdpbusd, a shift, a conversion, a
// multiply and an FMA.
//
// The decode is one unpack per 32 codes, from a property of bf16: with 7
// mantissa bits its step on [128, 256) is 1, so 128 + q is the bit pattern
// 0x4300 | q, a code byte interleaved with the byte 0x43 (vpunpck{l,h}bw).
// The kernel sums (128 + q) x and the 128 rides
// with the zero point:
//   sum_g s_g sum_k (q - z_g) x_k = sum_g s_g sum_k (128 + q) x_k - sum_g s_g (128 + z_g) X_g
// with X_g the sum of x over group g. The bias makes the partial sums some
// 30x larger than the result's: its fp32 output is 5.6e-6 off the fp64
// product (relative L2, 4096 x 4096, g128), against 5e-7 for the fp32
// kernels: nothing next to the bf16 output's rounding (3.9e-3), but the
// reason fp32 x does not come here split into three bf16 rows (which also
// won only at M = 1: 1.36x the fp32 GEMV).
//
// Layout: a 64-byte load holds 4 chunks (128 codes); byte j of a chunk has
// code j in its low nibble and code j + 16 in its high one. unpacklo / unpackhi
// work within 128-bit lanes, so vector v = 0..3 of a unit holds codes
// 8v..8v+7 of each chunk t in lane t, and the fp32 lanes 4t..4t+3 of a dot
// product belong to chunk t (whose scale they take). x is put in that order
// once per call: a 4 x 4 transpose of 128-bit lanes per 128 values.
#include <omp.h>

#include <algorithm>
#include <memory>

#include "int_kernels.h"
#include "thread_scratch.h"
#include "work_share.h"

namespace pyquant {

#if PQ_X86
namespace {

constexpr int64_t kUnit = 128;       // codes per 64-byte load (4 chunks)
constexpr int kMr = 8;               // rows of x per pass over a weight row
constexpr int64_t kRows = 16;        // weight rows per block handed to a thread
constexpr uint16_t kBias = 0x4300;   // bf16 128.0: the high byte 0x43 under every code
// x bytes per K block: with the weight rows streaming past, x stays in L1
// (48 KiB on Zen 5 and Sapphire Rapids' P-cores). Unblocked, 8 rows of x at
// K = 4096 (64 KiB) came from L2 for every weight row: 1.17 ms at M = 8.
constexpr int64_t kXBlockBytes = 16 * 1024;

}  // namespace

PQ_ISA_BEGIN(PQ_TARGET_STR_AVX512_BF16)
namespace {

// x (m, k) bf16 -> xt (m, kp) in unit order, zeros past K, and X (m, ldX):
// the fp32 sum of x over each group.
void prepare_x(const uint16_t* x, int64_t m, const IntWeight& w, int64_t kp, uint16_t* xt, float* X,
               int64_t ldX) {
  const int64_t k = w.k, gs = w.group_size < 0 ? k : w.group_size;
  for (int64_t r = 0; r < m; ++r) {
    const uint16_t* xr = x + r * k;
    uint16_t* out = xt + r * kp;
    float* Xr = X + r * ldX;
    std::fill(Xr, Xr + ldX, 0.0f);
    for (int64_t u = 0; u < kp; u += kUnit) {
      __m512i in[4];
      for (int v = 0; v < 4; ++v) {
        const int64_t j0 = u + 32 * v, left = k - j0;
        const __mmask32 mk = left >= 32 ? ~__mmask32(0) : left <= 0 ? 0 : (__mmask32(1) << left) - 1;
        in[v] = _mm512_maskz_loadu_epi16(mk, xr + j0);
        // chunk j0 / 32's sum, into its group (a chunk never straddles two)
        const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(in[v])), 16));
        const __m512 hi = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(in[v], 1)), 16));
        if (left > 0) Xr[j0 / gs] += _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
      }
      const __m512i t0 = _mm512_shuffle_i64x2(in[0], in[1], 0x44), t1 = _mm512_shuffle_i64x2(in[0], in[1], 0xEE);
      const __m512i t2 = _mm512_shuffle_i64x2(in[2], in[3], 0x44), t3 = _mm512_shuffle_i64x2(in[2], in[3], 0xEE);
      _mm512_storeu_si512(out + u, _mm512_shuffle_i64x2(t0, t2, 0x88));
      _mm512_storeu_si512(out + u + 32, _mm512_shuffle_i64x2(t0, t2, 0xDD));
      _mm512_storeu_si512(out + u + 64, _mm512_shuffle_i64x2(t1, t3, 0x88));
      _mm512_storeu_si512(out + u + 96, _mm512_shuffle_i64x2(t1, t3, 0xDD));
    }
  }
}

// Per weight row of a block, as fp32: its group scales (sf) and s_g (128 +
// z_g) (cz), ldX floats each, converted once instead of per unit and row of x.
void row_scales(const IntWeight& w, int64_t n0, int64_t n1, int64_t ldX, float* sf, float* cz) {
  for (int64_t n = n0; n < n1; ++n) {
    float *s_out = sf + (n - n0) * ldX, *c_out = cz + (n - n0) * ldX;
    const int64_t base = n * w.groups;
    for (int64_t g = 0; g < ldX; g += 16) {
      const int64_t cnt = std::max<int64_t>(0, w.groups - g);
      const __m512 sv = load16_avx512(w.scales, base + g, cnt, w.scale_dtype);
      const __m512 zv = w.zeros ? load16_avx512(w.zeros, base + g, cnt, w.scale_dtype) : _mm512_set1_ps(8.0f);
      _mm512_storeu_ps(s_out + g, sv);
      _mm512_storeu_ps(c_out + g, _mm512_mul_ps(sv, _mm512_add_ps(zv, _mm512_set1_ps(128.0f))));
    }
  }
}

// Lanes 4t..4t+3 of a unit's scales take chunk c + t's group: with 1 or 2
// chunks per group, lane t's group is (c + t) >> sh = c >> sh + idx[t].
inline __m512i unit_scale_index(int sh) {
  return sh == 0 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                 : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
}

// One K block (units [u0, u1)) of rows [n0, n1) against rows m0.. m0 + MR of
// x. part: per weight row, MR vectors carried between K blocks; on the last
// block the zero-point term is taken off and y written (bias added).
template <int MR>
void rows(const uint16_t* xt, int64_t kp, const float* X, int64_t ldX, int64_t m0, const IntWeight& w,
          const float* bias, int64_t n0, int64_t n1, int64_t u0, int64_t u1, const float* sf, const float* cz,
          __m512* part, float* y) {
  const int sh = w.group_size < 0 ? 62 : __builtin_ctzll(static_cast<unsigned long long>(w.chunks_per_group));
  const bool per_lane = sh < 2;  // else a unit's 4 chunks share one group (group sizes are powers of two >= 128)
  const __m512i sidx = unit_scale_index(sh);
  const __m512i m4 = _mm512_set1_epi8(0x0F), b43 = _mm512_set1_epi8(char(kBias >> 8));
  const __mmask64 tail = (__mmask64(1) << (w.row_bytes % 64)) - 1;  // the last unit's bytes when partial
  const bool first = u0 == 0, last = u1 * kUnit == kp;
  // Prefetch the same place kSliceAheadRows rows on (work_share.h), read
  // that many rows' K blocks later (the rows of a block take each K block in
  // turn); with the whole row in one K block, the next block of rows. (The
  // row's own next bytes would be too close: at M = 8 that ran at 5.5 GB/s.
  // With the whole row in one K block, M = 1, 32 KiB ahead ran at 0.31 ms
  // against 0.42 for 2 KiB, cold, K = N = 4096, one thread. With the row in K
  // blocks, the same rows' next K block, read after the other 15 rows' (64
  // KiB of weight at M = 1), left M = 1 at K = 11008 at 1.4x the time of 8
  // rows on, cold.)
  const int64_t ahead = first && last ? kRows * w.row_bytes : kSliceAheadRows * w.row_bytes;
  const uint16_t* xr[MR];
  for (int r = 0; r < MR; ++r) xr[r] = xt + (m0 + r) * kp;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.qweight + n * w.row_bytes;
    const float* srow = sf + (n - n0) * ldX;
    __m512* pn = part + (n - n0) * MR;
    __m512 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = first ? _mm512_setzero_ps() : pn[r];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t c = 4 * u;
      _mm_prefetch(reinterpret_cast<const char*>(row + c * 16 + ahead), _MM_HINT_T0);
      const __m512i v = c + 4 <= w.chunks ? _mm512_loadu_si512(row + c * 16) : _mm512_maskz_loadu_epi8(tail, row + c * 16);
      const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      const __m512bh w0 = (__m512bh)_mm512_unpacklo_epi8(lo, b43), w1 = (__m512bh)_mm512_unpackhi_epi8(lo, b43);
      const __m512bh w2 = (__m512bh)_mm512_unpacklo_epi8(hi, b43), w3 = (__m512bh)_mm512_unpackhi_epi8(hi, b43);
      // (the scale array is padded to whole vectors: reading 4 past the last group is in bounds)
      const __m512 sl = per_lane ? _mm512_permutexvar_ps(sidx, _mm512_castps128_ps512(_mm_loadu_ps(srow + (c >> sh))))
                                 : _mm512_set1_ps(srow[c >> sh]);
      for (int r = 0; r < MR; ++r) {
        const uint16_t* xu = xr[r] + u * kUnit;
        __m512 t0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), w0, (__m512bh)_mm512_loadu_si512(xu));
        __m512 t1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), w1, (__m512bh)_mm512_loadu_si512(xu + 32));
        t0 = _mm512_dpbf16_ps(t0, w2, (__m512bh)_mm512_loadu_si512(xu + 64));
        t1 = _mm512_dpbf16_ps(t1, w3, (__m512bh)_mm512_loadu_si512(xu + 96));
        acc[r] = _mm512_fmadd_ps(_mm512_add_ps(t0, t1), sl, acc[r]);
      }
    }
    if (!last) {
      for (int r = 0; r < MR; ++r) pn[r] = acc[r];
      continue;
    }
    // minus sum_g s_g (128 + z_g) X_g, in the accumulators' lanes (both padded with zeros)
    const float* crow = cz + (n - n0) * ldX;
    for (int64_t g = 0; g < ldX; g += 16) {
      const __m512 cv = _mm512_loadu_ps(crow + g);
      for (int r = 0; r < MR; ++r) acc[r] = _mm512_fnmadd_ps(cv, _mm512_loadu_ps(X + (m0 + r) * ldX + g), acc[r]);
    }
    const float b = bias ? bias[n] : 0.0f;
    for (int r = 0; r < MR; ++r) y[(m0 + r) * w.n + n] = _mm512_reduce_add_ps(acc[r]) + b;
  }
}

using RowsFn = void (*)(const uint16_t*, int64_t, const float*, int64_t, int64_t, const IntWeight&, const float*,
                        int64_t, int64_t, int64_t, int64_t, const float*, const float*, __m512*, float*);
constexpr RowsFn kRowsByMr[kMr + 1] = {nullptr,  rows<1>, rows<2>, rows<3>, rows<4>,
                                       rows<5>, rows<6>, rows<7>, rows<8>};

// A block of weight rows against every row of x: x in K blocks that stay in
// L1 (MR rows x kXBlockBytes), the rows' partial sums carried in `part`.
void block(const uint16_t* xt, int64_t kp, const float* X, int64_t ldX, int64_t m, const IntWeight& w,
           const float* bias, int64_t n0, int64_t n1, float* sf, float* cz, __m512* part, float* y) {
  row_scales(w, n0, n1, ldX, sf, cz);
  const int64_t units = kp / kUnit;
  for (int64_t m0 = 0; m0 < m; m0 += kMr) {
    const int mr = int(std::min<int64_t>(kMr, m - m0));
    const int64_t ub = std::max<int64_t>(1, kXBlockBytes / (mr * kUnit * 2));
    for (int64_t u0 = 0; u0 < units; u0 += ub)
      kRowsByMr[mr](xt, kp, X, ldX, m0, w, bias, n0, n1, u0, std::min(units, u0 + ub), sf, cz, part, y);
  }
}

}  // namespace
PQ_ISA_END

bool int4_bf16_supported(const IntWeight& w) { return w.bits == 4 && simd_has_avx512_bf16(); }

void int4_bf16_qmatmul(const uint16_t* x, int64_t m, const IntWeight& w, const float* bias, const LoraEpilogue& lora,
                       float* y, int nthreads) {
  const int64_t kp = (w.chunks + 3) / 4 * kUnit, ldX = (w.groups + 15) / 16 * 16;
  const int nshare = std::max(nthreads, 1);
  // One per-thread scratch buffer (kept between calls: at M = 64, K = 4096 x
  // alone is 512 KiB, which a per-call allocation would page-fault through
  // every time), taken here, before the parallel region, and cut into: x in
  // unit order (rows 64-byte aligned, kp being a multiple of 128 values: a
  // vector load that straddles two cache lines costs two), its group sums X,
  // and per thread the block's row scales (two arrays of kRows x ldX) and
  // partial sums (kRows x kMr vectors). Every piece is a multiple of 16 floats.
  const int64_t xt_floats = m * kp / 2, X_floats = m * ldX;
  const int64_t scratch = 2 * kRows * ldX + kRows * kMr * 16;
  float* const base = thread_scratch(xt_floats + X_floats + scratch * nshare, Scratch::kXPanels);
  uint16_t* const xt = reinterpret_cast<uint16_t*>(base);
  float* const X = base + xt_floats;
  float* const buf = X + X_floats;
  prepare_x(x, m, w, kp, xt, X, ldX);
  std::unique_ptr<Share[]> share(new Share[nshare]);
  const int64_t blocks = (w.n + kRows - 1) / kRows;
  init_shares(share.get(), nshare, blocks);
#pragma omp parallel num_threads(nshare)
  {
    const int t = omp_get_thread_num();
    float* mine = buf + scratch * t;
    float *sf = mine + kRows * kMr * 16, *cz = sf + kRows * ldX;
    __m512* part = reinterpret_cast<__m512*>(mine);
    run_shared(share.get(), nshare, t, [&](int64_t b) {
      const int64_t n0 = b * kRows, n1 = std::min(w.n, n0 + kRows);
      block(xt, kp, X, ldX, m, w, bias, n0, n1, sf, cz, part, y);
      lora.apply(y, w.n, 0, m, n0, n1);
    });
  }
}
#else
bool int4_bf16_supported(const IntWeight&) { return false; }
void int4_bf16_qmatmul(const uint16_t*, int64_t, const IntWeight&, const float*, const LoraEpilogue&, float*, int) {}
#endif

}  // namespace pyquant
