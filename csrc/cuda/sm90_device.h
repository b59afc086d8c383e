// Device facts the CUTLASS launchers (*_sm90.cu) pass to their kernels.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>

#include "cuda_check.h"

namespace pyquant {

// The SM count of the current device, read once per device: CUTLASS's
// persistent tile schedulers size their grids by it, and would otherwise
// query it on every call.
inline int sm90_sm_count() {
  static int cached[64] = {};
  int dev = 0;
  PQ_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) throw std::runtime_error("sm90_sm_count: device index out of range");
  if (cached[dev] == 0) PQ_CUDA_CHECK(cudaDeviceGetAttribute(&cached[dev], cudaDevAttrMultiProcessorCount, dev));
  return cached[dev];
}

}  // namespace pyquant
