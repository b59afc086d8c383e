// Int4 weight-only GEMM for prefill sizes (M > 64) on Hopper: CUTLASS 3.x's
// mixed-input collective (TMA loads, warp-specialized pipeline, the int4
// operand converted to fp16/bf16 in registers and fed to wgmma from there),
// reading IntMMA weights as they are stored. Built only for sm_90a, where the
// CUTLASS headers were found (CMakeLists.txt: the *_sm90.cu files).
// Experimental until a GPU run passes it; the spec is the reference qmatmul
// of an IntMMA weight (pyquant.ops.reference).
//
// y^T = W x^T: the weight is operand A (the narrow type must be A for the TMA
// epilogue), x (M, K) row-major is a K-major B, and y (M, N) row-major is a
// column-major D of the swapped problem (N, M).
//
// No repacked copy of the weight: IntMMA's byte layout is a CuTe layout
// (int4mma_cute.cuh) that CUTLASS takes in place of A's stride. A 128 x 64
// tile of it is eight whole 512-byte blocks, which the TMA brings into shared
// memory as they are; each lane then owns 16 contiguous bytes per 64 columns
// (one LDS.128), and each 32-bit word holds an mma A fragment's 8 codes in
// the [0,2,4,6,1,3,5,7] order of CUTLASS's lop3 int4 -> 16-bit converters.
//
// Scales and zeros: CUTLASS computes w = s * q + z' per group on unsigned
// codes q, so the caller passes natural-order scales (N-major, (G, Np)) and
// z' = -s * z (IntMMA's symmetric weights: z = 8), both in x's dtype. The
// group size must be a multiple of the 64-column k tile, or the whole row.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "int4mma_cute.cuh"
#include "launchers_sm90.h"
#include "cutlass_sm90.cuh"
#include "pyquant/common.h"

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace pyquant {
namespace {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

// K tile: 128 bytes of 16-bit x per row (the collective's swizzle unit).
constexpr int kTileK = 64;

template <typename T>
struct Int4MmaSm90 {
  using Tile = Shape<_128, _128, Int<kTileK>>;
  using Cluster = Shape<_1, _1, _1>;
  using Schedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<T>::value;

  // D = acc + bias[n]: bias is per row of the swapped problem (nullptr: + 0).
  using Bias = fusion::Sm90ColBroadcast<0, Tile, float, float, Stride<_1, _0, int64_t>>;
  using Fusion = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, T, float, kRound>, fusion::Sm90AccFetch, Bias>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::ColumnMajor, kAlign, T,
      cutlass::layout::ColumnMajor, kAlign, EpilogueSchedule, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<cutlass::uint4b_t, T, T>, Int4MMALayout,
      128 / 4, T, cutlass::layout::ColumnMajor, kAlign, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      Schedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const Int4MmaSm90Args& a, int sm_count) {
    using StrideX = typename Kernel::StrideB;
    using StrideS = typename Mainloop::StrideScale;
    using StrideD = typename Kernel::StrideD;
    const int m = int(a.m), n = int(a.n), k = int(a.k), np = int(a.np), kp = int(a.kp);
    const int groups = int((a.k + a.group - 1) / a.group);
    const StrideD stride_y = cutlass::make_cute_packed_stride(StrideD{}, make_shape(n, m, 1));
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {n, m, k, 1},
        {reinterpret_cast<const cutlass::uint4b_t*>(a.qweight), int4mma_layout(np, kp),
         reinterpret_cast<const T*>(a.x), cutlass::make_cute_packed_stride(StrideX{}, make_shape(m, k, 1)),
         reinterpret_cast<const T*>(a.scales), cutlass::make_cute_packed_stride(StrideS{}, make_shape(np, groups, 1)),
         int(a.group), reinterpret_cast<const T*>(a.zeros)},
        {{}, nullptr, stride_y, reinterpret_cast<T*>(a.out), stride_y}};
    args.epilogue.thread = {{}, {reinterpret_cast<const float*>(a.bias)}, {}};
    args.hw_info.sm_count = sm_count;
    return args;
  }

  static void run(const Int4MmaSm90Args& a, int sm_count, void* workspace, int64_t workspace_bytes,
                  cudaStream_t stream) {
    const std::string shape = "M=" + std::to_string(a.m) + " N=" + std::to_string(a.n) + " K=" + std::to_string(a.k) +
                              " group=" + std::to_string(a.group);
    run_cutlass_gemm<Gemm>("int4mma_sm90_gemm_cuda", shape, arguments(a, sm_count), workspace, workspace_bytes,
                           stream);
  }

  static int64_t workspace(const Int4MmaSm90Args& a, int sm_count) {
    return int64_t(Gemm::get_workspace_size(arguments(a, sm_count)));
  }
};

}  // namespace

// check and with_gemm: what sm90_workspace_bytes and sm90_launch (cutlass_sm90.cuh) call.
void check(const Int4MmaSm90Args& a) {
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument("int4mma_sm90_gemm_cuda: " + why + " (M=" + std::to_string(a.m) + " N=" +
                                std::to_string(a.n) + " K=" + std::to_string(a.k) + " group=" +
                                std::to_string(a.group) + ")");
  };
  if (a.np != (a.n + 15) / 16 * 16 || a.kp != (a.k + 63) / 64 * 64) fail("np/kp are not IntMMA's padded shape");
  if (a.k % 8) fail("K must be a multiple of 8 (16-byte rows of x)");
  if (a.n % 8) fail("N must be a multiple of 8 (16-byte output rows for the TMA store)");
  if (a.group <= 0 || (a.group != a.k && a.group % kTileK))
    fail("the group must be the whole row or a multiple of 64 (the k tile)");
  if (a.m > 0x7fffffff || a.np > 0x7fffffff || a.kp > 0x7fffffff) fail("a dimension exceeds int32");
  if (a.x % 16 || a.qweight % 16 || a.out % 16 || a.scales % 16 || a.zeros % 16 || a.bias % 16)
    fail("every pointer must be 16-byte aligned");
  if (a.dtype != kF16 && a.dtype != kBF16) fail("x must be fp16 or bf16");
}

template <typename Fn>
auto with_gemm(const Int4MmaSm90Args& a, Fn&& fn) {
  return a.dtype == kF16 ? fn(Int4MmaSm90<cutlass::half_t>{}) : fn(Int4MmaSm90<cutlass::bfloat16_t>{});
}

Int4MmaSm90Args make_args(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t bias,
                          uintptr_t out, int64_t m, int64_t n, int64_t k, int64_t group, int dtype) {
  return Int4MmaSm90Args{x, qweight, scales, zeros, bias, out, m, n, k, (n + 15) / 16 * 16, (k + 63) / 64 * 64,
                         group, dtype};
}

int64_t int4mma_sm90_workspace_bytes(int64_t m, int64_t n, int64_t k, int64_t group, int dtype) {
  if (m == 0 || n == 0) return 0;
  // The size depends on the shape only: aligned placeholder pointers pass the checks.
  return sm90_workspace_bytes(make_args(16, 16, 16, 16, 0, 16, m, n, k, group, dtype));
}

void int4mma_sm90_gemm_cuda(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t bias,
                            uintptr_t out, uintptr_t workspace, int64_t workspace_bytes, int64_t m, int64_t n,
                            int64_t k, int64_t group, int dtype, uintptr_t stream) {
  if (m == 0 || n == 0) return;
  sm90_launch(make_args(x, qweight, scales, zeros, bias, out, m, n, k, group, dtype), workspace, workspace_bytes,
              stream);
}

}  // namespace pyquant
