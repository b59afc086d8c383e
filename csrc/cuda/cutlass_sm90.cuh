// What the CUTLASS launchers (*_sm90.cu) share: the SM count their persistent
// tile schedulers size grids by, running a GemmUniversalAdapter with every
// status checked and turned into an exception that names the shape, and the
// two entry points every launcher has.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "cutlass/cutlass.h"

namespace pyquant {

// The SM count of the current device, read once per device (CUTLASS would
// otherwise query it on every call).
inline int sm90_sm_count() {
  static int cached[64] = {};
  int dev = 0;
  PQ_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) throw std::runtime_error("sm90_sm_count: device index out of range");
  if (cached[dev] == 0) PQ_CUDA_CHECK(cudaDeviceGetAttribute(&cached[dev], cudaDevAttrMultiProcessorCount, dev));
  return cached[dev];
}

// can_implement, the workspace size, initialize and run of `Gemm` on `stream`;
// `who` and `shape` name the launcher and the problem in every error.
template <typename Gemm>
void run_cutlass_gemm(const char* who, const std::string& shape, const typename Gemm::Arguments& args,
                      void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  Gemm gemm;
  const cutlass::Status ok = gemm.can_implement(args);
  if (ok != cutlass::Status::kSuccess)
    throw std::invalid_argument(std::string(who) + ": CUTLASS cannot take " + shape + ": " +
                                cutlassGetStatusString(ok));
  if (static_cast<int64_t>(Gemm::get_workspace_size(args)) > workspace_bytes)
    throw std::invalid_argument(std::string(who) + ": workspace of " + std::to_string(workspace_bytes) +
                                " bytes is too small for " + shape);
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string(who) + ": CUTLASS initialize failed for " + shape);
  const cutlass::Status ran = gemm.run(stream);
  PQ_CUDA_CHECK(cudaGetLastError());
  if (ran != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string(who) + ": launch failed for " + shape + ": " + cutlassGetStatusString(ran));
}

// A launcher's workspace size and launch, over the two functions each launcher
// defines for its argument struct (found by argument-dependent lookup in
// namespace pyquant): check(a), which throws on what its kernel cannot take,
// and with_gemm(a, fn), which calls fn with the instantiation a selects.
template <typename Args>
int64_t sm90_workspace_bytes(const Args& a) {
  check(a);
  return with_gemm(a, [&](auto g) { return decltype(g)::workspace(a, sm90_sm_count()); });
}

template <typename Args>
void sm90_launch(const Args& a, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  check(a);
  with_gemm(a, [&](auto g) {
    decltype(g)::run(a, sm90_sm_count(), reinterpret_cast<void*>(workspace), workspace_bytes,
                     reinterpret_cast<cudaStream_t>(stream));
    return 0;
  });
}

}  // namespace pyquant
