// The optional low-rank epilogue of the Int and NF4 qmatmul kernels (QLoRA):
//   y[m, n] += scale * sum_j xa[m, j] * b[n, j]
// with xa = x @ A.T (M x r, fp32, computed by the caller) and b = B (N x r,
// fp32). Kernels apply it to each tile of y they have just written, while
// the tile is in cache, instead of a second pass over y.
#pragma once
#include <cstdint>

#include "simd.h"

namespace pyquant {

struct LoraEpilogue;

// The AVX2 body of LoraEpilogue::apply (lora_epilogue.cpp).
void lora_epilogue_avx2(const LoraEpilogue& e, float* y, int64_t ldy, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

struct LoraEpilogue {
  const float* xa = nullptr;  // (M, rank) row-major
  const float* b = nullptr;   // (N, rank) row-major
  int64_t rank = 0;
  float scale = 0.0f;
  // Read where the epilogue is built (the bindings), not in apply(): apply
  // runs inside the kernels' parallel regions, where an exception from
  // simd_level() (a PYQUANT_SIMD the CPU lacks) could not reach Python.
  bool avx2 = simd_has_avx2();

  bool active() const { return xa != nullptr && b != nullptr && rank > 0 && scale != 0.0f; }

  // y rows [m0, m1) x columns [n0, n1) of y (row stride ldy). The r-long dot
  // products cost M x N x r multiply-adds, a tenth of the base product at
  // K = 576 and r = 16 (SmolLM2): scalar, that was 40% of a tiled layer's
  // time, hence the vector body.
  void apply(float* y, int64_t ldy, int64_t m0, int64_t m1, int64_t n0, int64_t n1) const {
    if (!active()) return;
#if PQ_X86
    if (avx2) return lora_epilogue_avx2(*this, y, ldy, m0, m1, n0, n1);
#endif
    for (int64_t m = m0; m < m1; ++m) {
      const float* a = xa + m * rank;
      for (int64_t n = n0; n < n1; ++n) {
        const float* bn = b + n * rank;
        float s = 0.0f;
        for (int64_t j = 0; j < rank; ++j) s += a[j] * bn[j];
        y[m * ldy + n] += scale * s;
      }
    }
  }
};

}  // namespace pyquant
