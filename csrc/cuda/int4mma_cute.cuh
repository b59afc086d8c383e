// IntMMA's qweight (pyquant/formats/int_mma.py) as a CuTe layout, for kernels
// built on CUTLASS 3.x collectives (int4mma_sm90.cu). Host and device code,
// no CUDA runtime: tests/ops/test_int4mma_sm90_layout.py evaluates it on the
// CPU against the format's packer.
//
// The format puts code (n, k) of a (Np, Kp) weight, n = 16T + 8h + g and
// k = 64kb + 16j + 8c + 2t + e, at nibble
//   (T * Kp/64 + kb) * 1024 + (4g + t) * 32 + 8j + (h + 2c + 4e)
// of the uint8 tensor (low nibble first): a bit permutation of (n, k), so one
// hierarchical layout with modes (g, h, T) along n and (e, t, c, j, kb) along
// k holds it exactly. The nibble order inside each 32-bit word is the value
// order [0, 2, 4, 6, 1, 3, 5, 7] of an mma A fragment's 8 values, which is
// the order CUTLASS's fast int4 -> 16-bit converters expect: no shuffle needed.
#pragma once
#include <cstdint>

#include "cute/layout.hpp"

namespace pyquant {

// (n, k, l) -> nibble offset, for a weight padded to np x kp (multiples of 16
// and 64), one batch.
CUTE_HOST_DEVICE auto int4mma_layout(int np, int kp) {
  using namespace cute;
  const int tiles = np / 16, blocks = kp / 64;
  const int64_t tile_stride = int64_t(blocks) * 1024;
  return make_layout(
      make_shape(make_shape(_8{}, _2{}, tiles), make_shape(_2{}, _4{}, _2{}, _4{}, blocks), 1),
      make_stride(make_stride(_128{}, _1{}, tile_stride), make_stride(_4{}, _32{}, _2{}, _8{}, _1024{}),
                  int64_t(tiles) * tile_stride));
}

using Int4MMALayout = decltype(int4mma_layout(16, 64));

}  // namespace pyquant
