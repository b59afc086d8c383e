// NF4, the transposed product of the backward pass: out (M, K) = g (M, N) @
// W (N, K), and the column panels of the large-M path. A row segment is a
// flat index range of the bitsandbytes layout (blocks may span rows, a row
// may start on a low nibble), which decode_range_* already walk bit-exactly;
// transposed_matmul.h does the rest.
#include "nf4_kernels.h"
#include "transposed_matmul.h"

namespace pyquant {
namespace nf4cpu {
namespace {

template <class Body>
void with_row_decoder(const Weight& w, const Body& body) {
  const bool avx2 = simd_level() != Simd::kScalar;
  const int64_t K = w.k;
  if (avx2) {
    body([&w, K](int64_t row, int64_t k0, int64_t k1, float* dst) { decode_range_avx2(w, row * K + k0, row * K + k1, dst); },
         true);
  } else {
    body([&w, K](int64_t row, int64_t k0, int64_t k1, float* dst) { decode_range_scalar(w, row * K + k0, row * K + k1, dst); },
         false);
  }
}

}  // namespace

void qmatmul_t(const Weight& w, const float* g, int64_t m, float* out, int nthreads) {
  with_row_decoder(w, [&](const auto& decode, bool avx2) { transposed_matmul(g, m, w.n, w.k, decode, out, nthreads, avx2); });
}

void decode_panel(const Weight& w, int64_t k0, int64_t k1, float* out, int nthreads) {
  with_row_decoder(w, [&](const auto& decode, bool) { pyquant::decode_panel(w.n, k0, k1, decode, out, nthreads); });
}

}  // namespace nf4cpu
}  // namespace pyquant
