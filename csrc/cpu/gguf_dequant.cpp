// GGUF block dequantization to fp32, bit-exact with gguf-py (gguf/quants.py).
//
// The AVX2 path decodes the integer codes in the byte domain (32 codes per
// 256-bit register), widens them 8 at a time and applies the scale with the
// same fp32 operations as gguf-py: a product (always exact, see
// pyquant/gguf_blocks.h) and, where the format has an offset, one add. The
// offset is added as `+ (-ml)`, which IEEE defines to equal `- ml` exactly.
#include <omp.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <stdexcept>
#include <string>

#include "gguf_kernels.h"
#include "gguf_avx2.h"  // x86 only; empty elsewhere

namespace pyquant {
namespace gguf {
namespace {

// ---------------------------------------------------------------- scalar ---

template <void (*Block)(const uint8_t*, float*), int BS, int TS>
void range_scalar(const uint8_t* src, float* dst, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) Block(src + i * TS, dst + i * BS);
}

#define PQ_SCALAR_RANGE(T, fn) range_scalar<fn, Layout##T::kBlock, Layout##T::kBytes>

// ------------------------------------------------------------------ AVX2 ---
#if PQ_X86

using avx2::f16_at;
using avx2::load256;

// out[0..16) = d0 * q[0..16), out[16..32) = d1 * q[16..32), q signed bytes.
PQ_TARGET_AVX2 inline void store_s8(__m256i q, float d0, float d1, float* out) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m256 vd0 = _mm256_set1_ps(d0), vd1 = _mm256_set1_ps(d1);
  _mm256_storeu_ps(out + 0, _mm256_mul_ps(vd0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo))));
  _mm256_storeu_ps(out + 8, _mm256_mul_ps(vd0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)))));
  _mm256_storeu_ps(out + 16, _mm256_mul_ps(vd1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi))));
  _mm256_storeu_ps(out + 24, _mm256_mul_ps(vd1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)))));
}

// out = d * q + c (a rounded product, then a rounded sum: gguf's order), q
// unsigned bytes; (d0, c0) for the first 16 codes, (d1, c1) for the rest.
PQ_TARGET_AVX2 inline void store_u8_affine(__m256i q, float d0, float c0, float d1, float c1, float* out) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m256 vd0 = _mm256_set1_ps(d0), vc0 = _mm256_set1_ps(c0);
  const __m256 vd1 = _mm256_set1_ps(d1), vc1 = _mm256_set1_ps(c1);
  // Separate mul and add intrinsics; contraction into an FMA could not change
  // the result anyway, because the product is exact.
  _mm256_storeu_ps(out + 0,
                   _mm256_add_ps(_mm256_mul_ps(vd0, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo))), vc0));
  _mm256_storeu_ps(out + 8, _mm256_add_ps(_mm256_mul_ps(vd0, _mm256_cvtepi32_ps(
                                                                   _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)))),
                                          vc0));
  _mm256_storeu_ps(out + 16,
                   _mm256_add_ps(_mm256_mul_ps(vd1, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi))), vc1));
  _mm256_storeu_ps(out + 24, _mm256_add_ps(_mm256_mul_ps(vd1, _mm256_cvtepi32_ps(
                                                                    _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)))),
                                           vc1));
}

// 16 bytes of nibble pairs -> 32 codes: low nibbles first, then high (Q4_0/Q4_1/Q5_*).
PQ_TARGET_AVX2 inline __m256i nibbles32(const uint8_t* qs) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
}

// Byte j = 0x10 if bit j of the little-endian word at qh is set (the Q5 5th bit).
PQ_TARGET_AVX2 inline __m256i qh_bits32(const uint8_t* qh) {
  // shuffle_epi8 works within 128-bit lanes; both lanes hold the 4 qh bytes,
  // so the low lane fans out bytes 0-1 and the high lane bytes 2-3.
  const __m256i v = _mm256_set1_epi32(static_cast<int>(load_u32le(qh)));
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, spread), bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

PQ_TARGET_AVX2 inline __m256i srl16(__m256i v, int n) { return _mm256_srl_epi16(v, _mm_cvtsi32_si128(n)); }

PQ_TARGET_AVX2 inline void block_q4_0(const uint8_t* b, float* out) {
  const float d = f16_at(b + LayoutQ4_0::kD);
  const __m256i q = _mm256_sub_epi8(nibbles32(b + LayoutQ4_0::kQs), _mm256_set1_epi8(8));
  store_s8(q, d, d, out);
}

PQ_TARGET_AVX2 inline void block_q4_1(const uint8_t* b, float* out) {
  const float d = f16_at(b + LayoutQ4_1::kD), m = f16_at(b + LayoutQ4_1::kM);
  store_u8_affine(nibbles32(b + LayoutQ4_1::kQs), d, m, d, m, out);
}

PQ_TARGET_AVX2 inline void block_q5_0(const uint8_t* b, float* out) {
  const float d = f16_at(b + LayoutQ5_0::kD);
  const __m256i q = _mm256_or_si256(nibbles32(b + LayoutQ5_0::kQs), qh_bits32(b + LayoutQ5_0::kQh));
  store_s8(_mm256_sub_epi8(q, _mm256_set1_epi8(16)), d, d, out);
}

PQ_TARGET_AVX2 inline void block_q5_1(const uint8_t* b, float* out) {
  const float d = f16_at(b + LayoutQ5_1::kD), m = f16_at(b + LayoutQ5_1::kM);
  const __m256i q = _mm256_or_si256(nibbles32(b + LayoutQ5_1::kQs), qh_bits32(b + LayoutQ5_1::kQh));
  store_u8_affine(q, d, m, d, m, out);
}

PQ_TARGET_AVX2 inline void block_q8_0(const uint8_t* b, float* out) {
  const float d = f16_at(b + LayoutQ8_0::kD);
  store_s8(load256(b + LayoutQ8_0::kQs), d, d, out);
}

// -x exactly (a sign flip, so -(+0) = -0 as in gguf's `a - b`), unlike 0 - x.
PQ_TARGET_AVX2 inline __m256 negate(__m256 v) { return _mm256_xor_ps(v, _mm256_set1_ps(-0.0f)); }

PQ_TARGET_AVX2 inline __m256 u8x8_lo_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

PQ_TARGET_AVX2 inline void block_q2_k(const uint8_t* b, float* out) {
  const __m256 d = _mm256_set1_ps(f16_at(b + LayoutQ2_K::kD)), dmin = _mm256_set1_ps(f16_at(b + LayoutQ2_K::kDmin));
  const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + LayoutQ2_K::kScales));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const __m128i sl = _mm_and_si128(s, m4), sh = _mm_and_si128(_mm_srli_epi16(s, 4), m4);
  alignas(32) float dl[16], nml[16];
  _mm256_store_ps(dl, _mm256_mul_ps(d, u8x8_lo_to_ps(sl)));
  _mm256_store_ps(dl + 8, _mm256_mul_ps(d, u8x8_lo_to_ps(_mm_srli_si128(sl, 8))));
  _mm256_store_ps(nml, negate(_mm256_mul_ps(dmin, u8x8_lo_to_ps(sh))));
  _mm256_store_ps(nml + 8, negate(_mm256_mul_ps(dmin, u8x8_lo_to_ps(_mm_srli_si128(sh, 8)))));
  const __m256i m3 = _mm256_set1_epi8(3);
  for (int h = 0; h < 2; ++h) {
    const __m256i qs = load256(b + LayoutQ2_K::kQs + 32 * h);
    for (int sh2 = 0; sh2 < 4; ++sh2) {
      const int j = h * 8 + sh2 * 2;
      store_u8_affine(_mm256_and_si256(srl16(qs, 2 * sh2), m3), dl[j], nml[j], dl[j + 1], nml[j + 1],
                      out + h * 128 + sh2 * 32);
    }
  }
}

PQ_TARGET_AVX2 inline void block_q3_k(const uint8_t* b, float* out) {
  const __m256 d = _mm256_set1_ps(f16_at(b + LayoutQ3_K::kD));
  uint32_t sw[4];
  q3k_scales_all(b + LayoutQ3_K::kScales, sw);
  const __m256i off = _mm256_set1_epi32(32);
  alignas(32) float dl[16];
  for (int i = 0; i < 2; ++i) {
    const __m128i v = _mm_cvtsi64_si128(static_cast<long long>(sw[2 * i] | (uint64_t(sw[2 * i + 1]) << 32)));
    const __m256i sc = _mm256_sub_epi32(_mm256_cvtepu8_epi32(v), off);
    _mm256_store_ps(dl + 8 * i, _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc)));
  }
  const __m256i hm = load256(b + LayoutQ3_K::kHmask);
  const __m256i m3 = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4), zero = _mm256_setzero_si256();
  for (int h = 0; h < 2; ++h) {
    const __m256i qs = load256(b + LayoutQ3_K::kQs + 32 * h);
    for (int s = 0; s < 4; ++s) {
      const int c = h * 4 + s;
      const __m256i lo = _mm256_and_si256(srl16(qs, 2 * s), m3);
      // A clear hmask bit means -4 (the format stores the high bit inverted).
      const __m256i clear =
          _mm256_cmpeq_epi8(_mm256_and_si256(hm, _mm256_set1_epi8(static_cast<char>(1 << c))), zero);
      store_s8(_mm256_sub_epi8(lo, _mm256_and_si256(clear, four)), dl[2 * c], dl[2 * c + 1], out + c * 32);
    }
  }
}

PQ_TARGET_AVX2 inline void k_scales(const uint8_t* b, float* dl, float* nml) {
  __m256 vdl, vml;
  avx2::k_scales(b, vdl, vml);
  _mm256_store_ps(dl, vdl);
  _mm256_store_ps(nml, negate(vml));
}

PQ_TARGET_AVX2 inline void block_q4_k(const uint8_t* b, float* out) {
  alignas(32) float dl[8], nml[8];
  k_scales(b, dl, nml);
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int c = 0; c < 4; ++c) {
    const __m256i qs = load256(b + LayoutQ4_K::kQs + 32 * c);
    store_u8_affine(_mm256_and_si256(qs, m4), dl[2 * c], nml[2 * c], dl[2 * c], nml[2 * c], out + c * 64);
    store_u8_affine(_mm256_and_si256(_mm256_srli_epi16(qs, 4), m4), dl[2 * c + 1], nml[2 * c + 1], dl[2 * c + 1],
                    nml[2 * c + 1], out + c * 64 + 32);
  }
}

PQ_TARGET_AVX2 inline void block_q5_k(const uint8_t* b, float* out) {
  alignas(32) float dl[8], nml[8];
  k_scales(b, dl, nml);
  const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
  const __m256i qh = load256(b + LayoutQ5_K::kQh);
  for (int c = 0; c < 4; ++c) {
    const __m256i qs = load256(b + LayoutQ5_K::kQs + 32 * c);
    const int j0 = 2 * c, j1 = 2 * c + 1;
    const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(srl16(qh, j0), one), 4);
    const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(srl16(qh, j1), one), 4);
    store_u8_affine(_mm256_or_si256(_mm256_and_si256(qs, m4), h0), dl[j0], nml[j0], dl[j0], nml[j0], out + c * 64);
    store_u8_affine(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qs, 4), m4), h1), dl[j1], nml[j1], dl[j1],
                    nml[j1], out + c * 64 + 32);
  }
}

PQ_TARGET_AVX2 inline void block_q6_k(const uint8_t* b, float* out) {
  alignas(32) float dl[16];
  avx2::q6k_scales(b, dl);
  for (int h = 0; h < 2; ++h) {
    __m256i q[4];
    avx2::q6k_half(b, h, q);
    for (int s = 0; s < 4; ++s) {
      const int j = h * 8 + s * 2;
      store_s8(q[s], dl[j], dl[j + 1], out + h * 128 + s * 32);
    }
  }
}

#define PQ_AVX2_RANGE(name, T)                                                  \
  PQ_TARGET_AVX2 void range_avx2_##name(const uint8_t* src, float* dst, int64_t nb) { \
    for (int64_t i = 0; i < nb; ++i)                                            \
      block_##name(src + i * Layout##T::kBytes, dst + i * Layout##T::kBlock);   \
  }

PQ_AVX2_RANGE(q4_0, Q4_0)
PQ_AVX2_RANGE(q4_1, Q4_1)
PQ_AVX2_RANGE(q5_0, Q5_0)
PQ_AVX2_RANGE(q5_1, Q5_1)
PQ_AVX2_RANGE(q8_0, Q8_0)
PQ_AVX2_RANGE(q2_k, Q2_K)
PQ_AVX2_RANGE(q3_k, Q3_K)
PQ_AVX2_RANGE(q4_k, Q4_K)
PQ_AVX2_RANGE(q5_k, Q5_K)
PQ_AVX2_RANGE(q6_k, Q6_K)

#endif  // PQ_X86

}  // namespace

DecodeRangeFn decode_range_fn(int type, Simd level) {
#if PQ_X86
  if (level >= Simd::kAvx2) {
    switch (type) {
      case kQ4_0: return range_avx2_q4_0;
      case kQ4_1: return range_avx2_q4_1;
      case kQ5_0: return range_avx2_q5_0;
      case kQ5_1: return range_avx2_q5_1;
      case kQ8_0: return range_avx2_q8_0;
      case kQ2_K: return range_avx2_q2_k;
      case kQ3_K: return range_avx2_q3_k;
      case kQ4_K: return range_avx2_q4_k;
      case kQ5_K: return range_avx2_q5_k;
      case kQ6_K: return range_avx2_q6_k;
      default: return nullptr;
    }
  }
#endif
  switch (type) {
    case kQ4_0: return PQ_SCALAR_RANGE(Q4_0, dequant_block_q4_0);
    case kQ4_1: return PQ_SCALAR_RANGE(Q4_1, dequant_block_q4_1);
    case kQ5_0: return PQ_SCALAR_RANGE(Q5_0, dequant_block_q5_0);
    case kQ5_1: return PQ_SCALAR_RANGE(Q5_1, dequant_block_q5_1);
    case kQ8_0: return PQ_SCALAR_RANGE(Q8_0, dequant_block_q8_0);
    case kQ2_K: return PQ_SCALAR_RANGE(Q2_K, dequant_block_q2_k);
    case kQ3_K: return PQ_SCALAR_RANGE(Q3_K, dequant_block_q3_k);
    case kQ4_K: return PQ_SCALAR_RANGE(Q4_K, dequant_block_q4_k);
    case kQ5_K: return PQ_SCALAR_RANGE(Q5_K, dequant_block_q5_k);
    case kQ6_K: return PQ_SCALAR_RANGE(Q6_K, dequant_block_q6_k);
    default: return nullptr;
  }
}

namespace {

// A fresh torch.empty output of a whole weight is untouched memory, and
// faulting it in 4 KiB pages costs several times the decode itself (~40 ms
// vs ~5 ms for 64 MiB here). numpy madvises huge pages on large arrays by
// default (so gguf-py gets them); torch only with THP_MEM_ALLOC_ENABLE=1. The
// hint covers only the 2 MiB-aligned interior of our own output buffer and
// changes no contents; it is a no-op where THP is disabled.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end >= begin + 2 * kHuge) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

}  // namespace

void dequantize(int type, const uint8_t* src, float* dst, int64_t nblocks, int nthreads) {
  const DecodeRangeFn fn = decode_range_fn(type, simd_level());
  if (fn == nullptr) throw std::invalid_argument("unknown GGUF block type " + std::to_string(type));
  const int bs = block_size(type), ts = type_size(type);
  advise_huge_pages(dst, size_t(nblocks) * bs * sizeof(float));
  nthreads = threads_for(nblocks * bs, int64_t(1) << 18, nthreads);
  // Tasks of up to 2 MiB of output (one huge page, so threads fault in and
  // zero different pages in parallel instead of queueing on the same one),
  // at least 8 tasks per thread for balance on a shared machine, and at
  // least 32 KiB so scheduling stays cheap.
  const int64_t weights = std::max<int64_t>(8192, std::min<int64_t>(int64_t(1) << 19, nblocks * bs / (8 * nthreads)));
  const int64_t chunk = std::max<int64_t>(1, weights / bs);
  const int64_t ntasks = (nblocks + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t t = 0; t < ntasks; ++t) {
    const int64_t b0 = t * chunk;
    fn(src + b0 * ts, dst + b0 * bs, std::min(chunk, nblocks - b0));
  }
}

}  // namespace gguf
}  // namespace pyquant
