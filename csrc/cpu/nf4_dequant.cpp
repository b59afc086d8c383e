// NF4 dequantization on the CPU: flat ranges of the weight to fp32.
#include <algorithm>

#include "nf4_kernels.h"
#include "simd.h"

namespace pyquant {
namespace nf4cpu {

void decode_range_scalar(const Weight& w, int64_t begin, int64_t end, float* out) {
  const int sh = nf4_log2(w.block_size);
  for (int64_t i = begin, b = begin >> sh; i < end; ++b) {
    const int64_t seg_end = std::min((b + 1) << sh, end);
    const float s = w.scales(b);
    for (; i < seg_end; ++i) out[i - begin] = nf4_value(nf4_code(w.qweight, i)) * s;
  }
}

#if PQ_X86
PQ_TARGET_AVX2 void decode_range_avx2(const Weight& w, int64_t begin, int64_t end, float* out) {
  const int sh = nf4_log2(w.block_size);
  const Nf4Lut lut = nf4_lut();
  for (int64_t i = begin, b = begin >> sh; i < end; ++b) {
    const int64_t seg_end = std::min((b + 1) << sh, end);
    const float s = w.scales(b);
    const __m256 vs = _mm256_set1_ps(s);
    if (i & 1) {  // odd start: low nibble of a byte, then byte-aligned
      out[i - begin] = nf4_value(nf4_code(w.qweight, i)) * s;
      ++i;
    }
    for (; i + 16 <= seg_end; i += 16) {
      _mm256_storeu_ps(out + (i - begin), _mm256_mul_ps(nf4_decode8(lut, w.qweight + (i >> 1)), vs));
      _mm256_storeu_ps(out + (i - begin) + 8, _mm256_mul_ps(nf4_decode8(lut, w.qweight + (i >> 1) + 4), vs));
    }
    for (; i + 8 <= seg_end; i += 8) {
      _mm256_storeu_ps(out + (i - begin), _mm256_mul_ps(nf4_decode8(lut, w.qweight + (i >> 1)), vs));
    }
    for (; i < seg_end; ++i) out[i - begin] = nf4_value(nf4_code(w.qweight, i)) * s;
  }
}
#else
void decode_range_avx2(const Weight& w, int64_t begin, int64_t end, float* out) {
  decode_range_scalar(w, begin, end, out);
}
#endif

void dequantize(const Weight& w, float* out, int nthreads, int64_t row_begin, int64_t row_end) {
  const int64_t first = row_begin * w.k, last = row_end * w.k;
  // Chunks of ~16K values (whole blocks when the range starts on a block):
  // enough work per task to hide the scheduling.
  const int64_t per_chunk = std::max<int64_t>(1, (int64_t(1) << 14) / w.block_size) * w.block_size;
  const int64_t nchunks = (last - first + per_chunk - 1) / per_chunk;
  const bool avx2 = simd_has_avx2();
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b = first + c * per_chunk;
    const int64_t e = std::min(b + per_chunk, last);
    if (avx2) {
      decode_range_avx2(w, b, e, out + (b - first));
    } else {
      decode_range_scalar(w, b, e, out + (b - first));
    }
  }
}

}  // namespace nf4cpu
}  // namespace pyquant
