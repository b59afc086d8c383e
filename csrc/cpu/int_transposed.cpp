// Int format, the transposed product of the backward pass: out (M, K) =
// g (M, N) @ W_hat (N, K) in stored column order (pyquant/ops/backends/
// cpu_lora.py scatters act_order columns back), and the column panels the
// large-M path hands to torch's GEMM. Both decode one row segment at a time
// (transposed_matmul.h); values are the format's, bit for bit:
// (float(q) - z) * s, one subtraction and one multiply in fp32.
#include <algorithm>
#include <cstring>

#include "int_kernels.h"
#include "transposed_matmul.h"

namespace pyquant {
namespace {

// Columns [k0, k1) of row `row`; k0 is a multiple of the 32-code chunk, so a
// segment starts on a chunk and (group sizes being multiples of the chunk)
// every chunk lies inside one scale group.
void decode_row_scalar(const IntWeight& w, int64_t row, int64_t k0, int64_t k1, float* dst) {
  const uint8_t* q = w.qweight + row * w.row_bytes;
  const int cb = int_chunk_bytes(w.bits);
  uint8_t codes[kIntChunk];
  for (int64_t kk = k0, c = k0 / kIntChunk; kk < k1; kk += kIntChunk, ++c) {
    const int64_t g = c / w.chunks_per_group;
    const float s = w.scale(row, g), z = w.zero(row, g);
    int_decode_chunk(q + c * cb, w.bits, codes);
    const int64_t len = std::min<int64_t>(kIntChunk, k1 - kk);
    for (int64_t j = 0; j < len; ++j) dst[kk - k0 + j] = (float(codes[j]) - z) * s;
  }
}

#if PQ_X86
template <int BITS>
PQ_TARGET_AVX2 void decode_row_avx2(const IntWeight& w, int64_t row, int64_t k0, int64_t k1, float* dst) {
  constexpr int cb = kIntChunk * BITS / 8;
  const uint8_t* q = w.qweight + row * w.row_bytes;
  for (int64_t kk = k0, c = k0 / kIntChunk; kk < k1; kk += kIntChunk, ++c) {
    const int64_t g = c / w.chunks_per_group;
    const __m256 s = _mm256_set1_ps(scale_avx2(w, row, g)), z = _mm256_set1_ps(zero_avx2(w, row, g));
    __m256i v[4];
    int_decode_chunk_avx2<BITS>(q + c * cb, v);
    // The last chunk of a ragged row goes through a buffer: dst holds only
    // the k1 - kk values that exist.
    alignas(32) float tail[kIntChunk];
    float* to = kk + kIntChunk <= k1 ? dst + (kk - k0) : tail;
    for (int t = 0; t < 4; ++t) _mm256_storeu_ps(to + 8 * t, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(v[t]), z), s));
    if (to == tail) memcpy(dst + (kk - k0), tail, sizeof(float) * (k1 - kk));
  }
}
#endif

// Runs `body(decode)` with the row decoder for this weight and SIMD level
// (the bit-width switch happens here, outside any OpenMP region).
template <class Body>
void with_row_decoder(const IntWeight& w, bool avx2, const Body& body) {
#if PQ_X86
  if (avx2) {
    PQ_BITS_SWITCH(w.bits, kBits, "int_transposed", [&] {
      body([&w](int64_t row, int64_t k0, int64_t k1, float* dst) { decode_row_avx2<kBits>(w, row, k0, k1, dst); });
    });
    return;
  }
#endif
  body([&w](int64_t row, int64_t k0, int64_t k1, float* dst) { decode_row_scalar(w, row, k0, k1, dst); });
}

bool use_avx2() { return simd_level() != Simd::kScalar; }

}  // namespace

void int_qmatmul_t(const float* g, int64_t m, const IntWeight& w, float* out, int nthreads) {
  const bool avx2 = use_avx2();
  with_row_decoder(w, avx2, [&](const auto& decode) { transposed_matmul(g, m, w.n, w.k, decode, out, nthreads, avx2); });
}

void int_decode_panel(const IntWeight& w, int64_t k0, int64_t k1, float* out, int nthreads) {
  with_row_decoder(w, use_avx2(), [&](const auto& decode) { decode_panel(w.n, k0, k1, decode, out, nthreads); });
}

}  // namespace pyquant
