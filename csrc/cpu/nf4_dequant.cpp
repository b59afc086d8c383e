// NF4 dequantization on the CPU: flat ranges of the weight to fp32.
#include <algorithm>

#include "nf4_cpu.h"
#include "simd.h"

#if PQ_X86
#include <immintrin.h>
#endif

namespace pyquant {
namespace nf4cpu {

void decode_range_scalar(const Weight& w, int64_t begin, int64_t end, float* out) {
  const int64_t bs = w.block_size;
  int64_t i = begin;
  while (i < end) {
    const int64_t b = i / bs;
    const int64_t seg_end = std::min((b + 1) * bs, end);
    const float s = w.scales(b);
    for (; i < seg_end; ++i) out[i - begin] = nf4_value(nf4_code(w.qweight, i)) * s;
  }
}

#if PQ_X86
namespace {

// 16 consecutive codes starting at an even flat index (8 bytes) -> two vectors
// of codebook values. vpermps indexes 8 lanes with the low 3 bits, so codes
// 0-7 and 8-15 come from two tables and bit 3 (shifted into the sign bit)
// picks one with blendv: 4 shuffles per 8 values, no gather.
struct Lut16 {
  __m256 lo, hi;
};

PQ_TARGET_AVX2 inline Lut16 make_lut() {
  return {_mm256_loadu_ps(kNf4Codebook), _mm256_loadu_ps(kNf4Codebook + 8)};
}

PQ_TARGET_AVX2 inline __m256 lookup8(const Lut16& t, __m256i codes) {
  const __m256 a = _mm256_permutevar8x32_ps(t.lo, codes);
  const __m256 b = _mm256_permutevar8x32_ps(t.hi, codes);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
}

PQ_TARGET_AVX2 inline void codes16(const uint8_t* p, __m256i* c0, __m256i* c1) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  const __m128i lo = _mm_and_si128(raw, mask);
  // The first value of a byte is its high nibble: interleave hi, lo.
  const __m128i idx = _mm_unpacklo_epi8(hi, lo);
  *c0 = _mm256_cvtepu8_epi32(idx);
  *c1 = _mm256_cvtepu8_epi32(_mm_srli_si128(idx, 8));
}

}  // namespace

PQ_TARGET_AVX2 void decode_range_avx2(const Weight& w, int64_t begin, int64_t end, float* out) {
  const int64_t bs = w.block_size;
  const Lut16 lut = make_lut();
  int64_t i = begin;
  while (i < end) {
    const int64_t b = i / bs;
    const int64_t seg_end = std::min((b + 1) * bs, end);
    const float s = w.scales(b);
    const __m256 vs = _mm256_set1_ps(s);
    if (i & 1) {  // odd start: low nibble of a byte, then byte-aligned
      out[i - begin] = nf4_value(nf4_code(w.qweight, i)) * s;
      ++i;
    }
    for (; i + 16 <= seg_end; i += 16) {
      __m256i c0, c1;
      codes16(w.qweight + (i >> 1), &c0, &c1);
      _mm256_storeu_ps(out + (i - begin), _mm256_mul_ps(lookup8(lut, c0), vs));
      _mm256_storeu_ps(out + (i - begin) + 8, _mm256_mul_ps(lookup8(lut, c1), vs));
    }
    for (; i < seg_end; ++i) out[i - begin] = nf4_value(nf4_code(w.qweight, i)) * s;
  }
}
#else
void decode_range_avx2(const Weight& w, int64_t begin, int64_t end, float* out) {
  decode_range_scalar(w, begin, end, out);
}
#endif

void decode_range(const Weight& w, int64_t begin, int64_t end, float* out) {
  if (simd_level() == Simd::kAvx2) {
    decode_range_avx2(w, begin, end, out);
  } else {
    decode_range_scalar(w, begin, end, out);
  }
}

void dequantize(const Weight& w, float* out, int nthreads) {
  const int64_t numel = w.n * w.k;
  // Chunks of whole blocks, ~16K values: enough work per task, and a block's
  // scale is decoded by one thread only.
  const int64_t per_chunk = std::max<int64_t>(1, (int64_t(1) << 14) / w.block_size) * w.block_size;
  const int64_t nchunks = (numel + per_chunk - 1) / per_chunk;
  const bool avx2 = simd_level() == Simd::kAvx2;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b = c * per_chunk;
    const int64_t e = std::min(b + per_chunk, numel);
    if (avx2) {
      decode_range_avx2(w, b, e, out + b);
    } else {
      decode_range_scalar(w, b, e, out + b);
    }
  }
}

}  // namespace nf4cpu
}  // namespace pyquant
