// Int format: unpack (codes) and dequantize (fp32), AVX2 and scalar.
//
// Dequantize must match the reference bit for bit: each weight is
// (float(q) - z) * s, a subtraction then a multiplication, both rounded in
// fp32. Nothing here may fuse them (no FMA), and scales/zeros are widened to
// fp32 exactly (fp16/bf16 -> fp32 is exact).
#include <omp.h>

#include <cstring>

#include "int_kernels.h"

namespace pyquant {
namespace {

// Codes k0 .. k0+count of a chunk land at out[k0..] or, with act_order, at
// out[perm[k0..]] (the stored column j is logical column perm[j]).
inline void put_chunk(const float* vals, int count, int64_t k0, const int32_t* perm, float* out_row) {
  if (perm) {
    for (int j = 0; j < count; ++j) out_row[perm[k0 + j]] = vals[j];
  } else {
    memcpy(out_row + k0, vals, sizeof(float) * count);
  }
}

void dequant_rows_scalar(const IntWeight& w, const int32_t* perm, float* out, int64_t n0, int64_t n1) {
  const int64_t nch = w.chunks, cpg = w.chunks_per_group, rb = w.row_bytes;
  const int cb = int_chunk_bytes(w.bits);
  uint8_t codes[kIntChunk];
  float vals[kIntChunk];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.qweight + n * rb;
    float* orow = out + n * w.k;
    for (int64_t c = 0; c < nch; ++c) {
      const int64_t g = c / cpg;
      const float s = w.scale(n, g), z = w.zero(n, g);
      int_decode_chunk(row + c * cb, w.bits, codes);
      const int64_t k0 = c * kIntChunk;
      const int count = int(w.k - k0 < kIntChunk ? w.k - k0 : kIntChunk);
      for (int j = 0; j < count; ++j) vals[j] = (float(codes[j]) - z) * s;
      put_chunk(vals, count, k0, perm, orow);
    }
  }
}

#if PQ_X86
template <int BITS>
PQ_TARGET_AVX2 void dequant_rows_avx2(const IntWeight& w, const int32_t* perm, float* out, int64_t n0, int64_t n1) {
  const int64_t nch = w.chunks, cpg = w.chunks_per_group, rb = w.row_bytes;
  constexpr int cb = kIntChunk * BITS / 8;
  alignas(32) float vals[kIntChunk];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.qweight + n * rb;
    float* orow = out + n * w.k;
    for (int64_t g0 = 0; g0 < nch; g0 += cpg) {
      const int64_t g = g0 / cpg;
      const __m256 s = _mm256_set1_ps(scale_avx2(w, n, g)), z = _mm256_set1_ps(zero_avx2(w, n, g));
      const int64_t c1 = g0 + cpg < nch ? g0 + cpg : nch;
      for (int64_t c = g0; c < c1; ++c) {
        __m256i q[4];
        int_decode_chunk_avx2<BITS>(row + c * cb, q);
        const int64_t k0 = c * kIntChunk;
        const bool direct = !perm && k0 + kIntChunk <= w.k;
        float* dst = direct ? orow + k0 : vals;
        for (int t = 0; t < 4; ++t) {
          _mm256_storeu_ps(dst + 8 * t, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q[t]), z), s));
        }
        if (!direct) put_chunk(vals, int(w.k - k0 < kIntChunk ? w.k - k0 : kIntChunk), k0, perm, orow);
      }
    }
  }
}

template <int BITS>
PQ_TARGET_AVX2 void unpack_rows_avx2(const uint8_t* qweight, int64_t k, uint8_t* out, int64_t n0, int64_t n1) {
  const IntWeight w = IntWeight::make(qweight, nullptr, nullptr, 0, k, BITS, -1, kF32);
  const int64_t nch = w.chunks, rb = w.row_bytes;
  constexpr int cb = kIntChunk * BITS / 8;
  alignas(32) uint8_t tmp[kIntChunk];
  // packus works within 128-bit lanes; this puts the 4-byte groups back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = qweight + n * rb;
    uint8_t* orow = out + n * k;
    for (int64_t c = 0; c < nch; ++c) {
      const int64_t k0 = c * kIntChunk;
      const bool direct = k0 + kIntChunk <= k;
      uint8_t* dst = direct ? orow + k0 : tmp;
      __m256i codes;
      if constexpr (BITS == 8) {
        codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * cb));
      } else if constexpr (BITS == 4) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * cb));
        const __m128i m = _mm_set1_epi8(0xF);
        codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
      } else {
        __m256i q[4];
        int_decode_chunk_avx2<BITS>(row + c * cb, q);
        const __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(q[0], q[1]), _mm256_packus_epi32(q[2], q[3]));
        codes = _mm256_permutevar8x32_epi32(p, order);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), codes);
      if (!direct) memcpy(orow + k0, tmp, size_t(k - k0));
    }
  }
}
#endif

void unpack_rows_scalar(const uint8_t* qweight, int64_t k, int bits, uint8_t* out, int64_t n0, int64_t n1) {
  const int64_t nch = (k + kIntChunk - 1) / kIntChunk, rb = int_row_bytes(k, bits);
  const int cb = int_chunk_bytes(bits);
  uint8_t tmp[kIntChunk];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t c = 0; c < nch; ++c) {
      const int64_t k0 = c * kIntChunk;
      int_decode_chunk(qweight + n * rb + c * cb, bits, tmp);
      memcpy(out + n * k + k0, tmp, size_t(k - k0 < kIntChunk ? k - k0 : kIntChunk));
    }
  }
}

// Rows in blocks big enough to amortise the OpenMP hand-out.
template <typename F>
void parallel_rows(int64_t n, int nthreads, F&& body) {
  const int64_t block = 16;
  const int64_t blocks = (n + block - 1) / block;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * block;
    body(n0, n0 + block < n ? n0 + block : n);
  }
}

}  // namespace

void int_unpack(const uint8_t* qweight, int64_t n, int64_t k, int bits, uint8_t* out, int nthreads) {
#if PQ_X86
  if (simd_has_avx2()) {
    PQ_BITS_SWITCH(bits, kBits, "int_unpack", [&] {
      parallel_rows(n, nthreads,
                    [&](int64_t n0, int64_t n1) { unpack_rows_avx2<kBits>(qweight, k, out, n0, n1); });
    });
    return;
  }
#endif
  parallel_rows(n, nthreads, [&](int64_t n0, int64_t n1) { unpack_rows_scalar(qweight, k, bits, out, n0, n1); });
}

void int_dequantize(const IntWeight& w, const int32_t* perm, float* out, int nthreads) {
#if PQ_X86
  if (simd_has_avx2()) {
    PQ_BITS_SWITCH(w.bits, kBits, "int_dequantize", [&] {
      parallel_rows(w.n, nthreads,
                    [&](int64_t n0, int64_t n1) { dequant_rows_avx2<kBits>(w, perm, out, n0, n1); });
    });
    return;
  }
#endif
  parallel_rows(w.n, nthreads, [&](int64_t n0, int64_t n1) { dequant_rows_scalar(w, perm, out, n0, n1); });
}

}  // namespace pyquant
