#include "half_output.h"

#include <cstring>

#include "q8_kernels.h"
#include "simd.h"
#include "work_share.h"

#if PQ_X86
#include <immintrin.h>
#endif

namespace pyquant {
namespace {

// c10::BFloat16's rounding: ties to even on the 16 bits dropped; a NaN
// becomes the quiet NaN 0x7FC0 (rounding could carry it into an infinity).
inline uint16_t bf16_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

void to_bf16(const float* s, uint16_t* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_rne(s[i]);
}

void to_f16(const float* s, uint16_t* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = q8::float_to_half_rne(s[i]);
}

#if PQ_X86
// The same loop, vectorized by the compiler on 256 bits.
PQ_TARGET_AVX2 void to_bf16_avx2(const float* s, uint16_t* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_rne(s[i]);
}

PQ_TARGET_AVX2 void to_f16_f16c(const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  to_f16(s + i, d + i, n - i);
}
#endif

// Values per parallel block: below two blocks one thread converts (a region
// costs microseconds; 64 Ki values take ~10 us on one core).
constexpr int64_t kConvertBlock = int64_t(1) << 16;

}  // namespace

void store_fp32_as(int dtype, const float* src, void* dst, int64_t count, int nthreads) {
  uint16_t* out = static_cast<uint16_t*>(dst);
  void (*convert)(const float*, uint16_t*, int64_t) = dtype == kBF16 ? to_bf16 : to_f16;
#if PQ_X86
  if (simd_has_avx2()) convert = dtype == kBF16 ? to_bf16_avx2 : to_f16_f16c;
#endif
  const int64_t blocks = (count + kConvertBlock - 1) / kConvertBlock;
  parallel_shared(blocks > 1 ? nthreads : 1, blocks, [&](int64_t b) {
    const int64_t i0 = b * kConvertBlock;
    convert(src + i0, out + i0, std::min(kConvertBlock, count - i0));
  });
}

}  // namespace pyquant
