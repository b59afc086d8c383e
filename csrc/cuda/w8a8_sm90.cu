// W8A8 on Hopper: int8 wgmma GEMMs built from CUTLASS 3.x collectives (TMA
// loads, warp-specialized producer/consumer pipelines), with the W8A8 rescale
// fused into the epilogue. Built only for sm_90a (CMakeLists.txt: the
// *_sm90.cu files), and only where the CUTLASS headers were found
// (nvidia-cutlass). Experimental until a GPU run passes it; the spec is
// pyquant.ops.reference.w8a8_matmul_reference.
//
// Operands as they are stored, no repacked copy:
//   A = qa (M, kp) int8, the per-token codes of quantize_rows_w8a8_cuda, K-major;
//   B = the weight's codes (N, kp) uint8 with the implicit zero point 128, K-major.
// wgmma takes s8 x u8 directly (IGMMA .s8.u8), so the unsigned codes go in as
// they are: acc_u = sum qa (w - 128 + 128) = acc + 128 sum qa. The quantizer
// writes corr[m] = 128 * sum_k qa[m, k] next to each row's scale, and the
// epilogue subtracts it in int32 (exact: |acc| < 127 * 128 * K < 2^31 for any
// K below 132k, and the wrap-around of acc_u cancels in two's complement).
//
// Epilogue (an epilogue visitor tree, evaluated per accumulator fragment):
//   y = ((float(acc_u - corr[m]) * sa[m]) * sw[n]) + bias[n], each op rounded
// on its own, in the reference's order: the same bits as the spec when the
// quantizer's codes are. sw and bias arrive as fp32 (the caller converts them
// once); y is written in x's dtype by a TMA store.
//
// Two tile shapes, picked by M (kSmallM):
//   M <= 128: 64 x 64 x 256 tiles, clusters of 1 x 8 along N so one TMA
//     multicast feeds the same activation tile to 8 CTAs. The weight stream
//     (the bytes that matter at these sizes) is spread over N / 64 CTAs: 64
//     SMs stream a 4096-row weight, where 128 x 128 tiles would give 32.
//   M > 128: 128 x 128 x 128 tiles on two consumer warpgroups (cooperative),
//     clusters of 2 x 1 sharing the weight tile.
// Both run a persistent tile scheduler (one CTA per SM walks the tiles).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_check.h"
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

constexpr int64_t kSmallM = 128;

struct SmallTiles {
  using Tile = Shape<_64, _64, _256>;
  using Cluster = Shape<_1, _8, _1>;
  using Schedule = cutlass::gemm::KernelTmaWarpSpecialized;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
};

struct LargeTiles {
  using Tile = Shape<_128, _128, _128>;
  using Cluster = Shape<_2, _1, _1>;
  using Schedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
};

template <typename OutT, typename Tiles>
struct W8A8Gemm {
  using Tile = typename Tiles::Tile;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  // Per-row (token) and per-column (weight row) vectors; batch stride unused.
  template <typename T>
  using PerRow = fusion::Sm90ColBroadcast<0, Tile, T, T, Stride<_1, _0, int64_t>>;
  template <typename T>
  using PerCol = fusion::Sm90RowBroadcast<0, Tile, T, T, Stride<_0, _1, int64_t>>;
  template <template <class> class Fn, typename Out, typename In>
  using Op = fusion::Sm90Compute<Fn, Out, In, kRound>;

  using Signed = fusion::Sm90EVT<Op<cutlass::minus, float, int32_t>, fusion::Sm90AccFetch, PerRow<int32_t>>;
  using TimesSa = fusion::Sm90EVT<Op<cutlass::multiplies, float, float>, Signed, PerRow<float>>;
  using TimesSw = fusion::Sm90EVT<Op<cutlass::multiplies, float, float>, TimesSa, PerCol<float>>;
  using Fusion = fusion::Sm90EVT<Op<cutlass::plus, OutT, float>, TimesSw, PerCol<float>>;

  static constexpr int kOutAlign = 128 / cutlass::sizeof_bits<OutT>::value;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, typename Tiles::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void, cutlass::layout::RowMajor, kOutAlign,
      OutT, cutlass::layout::RowMajor, kOutAlign, typename Tiles::EpilogueSchedule, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, 16, uint8_t,
      cutlass::layout::ColumnMajor, 16, int32_t, Tile, typename Tiles::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Tiles::Schedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const W8A8Sm90Args& a, int sm_count) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    const int m = static_cast<int>(a.m), n = static_cast<int>(a.n), k = static_cast<int>(a.kp);
    const StrideD stride_d = cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1));
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {reinterpret_cast<const int8_t*>(a.qa), cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1)),
         reinterpret_cast<const uint8_t*>(a.w), cutlass::make_cute_packed_stride(StrideB{}, make_shape(n, k, 1))},
        {{}, nullptr, stride_d, reinterpret_cast<OutT*>(a.out), stride_d}};
    // The tree's arguments nest as its nodes do: children first, then the op.
    args.epilogue.thread = {
        {
            {
                {{}, {reinterpret_cast<const int32_t*>(a.corr)}, {}},  // acc_u - corr
                {reinterpret_cast<const float*>(a.sa)},               // * sa
                {},
            },
            {reinterpret_cast<const float*>(a.sw)},  // * sw
            {},
        },
        {reinterpret_cast<const float*>(a.bias)},  // + bias (nullptr: + 0)
        {},
    };
    args.hw_info.sm_count = sm_count;
    return args;
  }

  static void run(const W8A8Sm90Args& a, int sm_count, void* workspace, int64_t workspace_bytes,
                  cudaStream_t stream) {
    const std::string shape = "M=" + std::to_string(a.m) + " N=" + std::to_string(a.n) + " kp=" + std::to_string(a.kp);
    run_cutlass_gemm<Gemm>("w8a8_sm90_gemm_cuda", shape, arguments(a, sm_count), workspace, workspace_bytes, stream);
  }

  static int64_t workspace(const W8A8Sm90Args& a, int sm_count) {
    return static_cast<int64_t>(Gemm::get_workspace_size(arguments(a, sm_count)));
  }
};

}  // namespace

// check and with_gemm: what sm90_workspace_bytes and sm90_launch (cutlass_sm90.cuh) call.
void check(const W8A8Sm90Args& a) {
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument("w8a8_sm90_gemm_cuda: " + why + " (M=" + std::to_string(a.m) +
                                " N=" + std::to_string(a.n) + " kp=" + std::to_string(a.kp) + ")");
  };
  if (a.kp <= 0 || a.kp % 16) fail("kp must be a positive multiple of 16 (TMA rows)");
  if (a.n % 8) fail("N must be a multiple of 8 (16-byte output rows for the TMA store)");
  if (a.m > 0x7fffffff || a.n > 0x7fffffff || a.kp > 0x7fffffff) fail("a dimension exceeds int32");
  if (a.qa % 16 || a.w % 16 || a.out % 16) fail("qa, w and out must be 16-byte aligned");
  if (a.sw % 16 || a.sa % 16 || a.corr % 16 || a.bias % 16) fail("sa, corr, sw and bias must be 16-byte aligned");
  if (a.out_dtype != kF16 && a.out_dtype != kBF16) fail("out_dtype must be fp16 or bf16");
}

template <typename Fn>
auto with_gemm(const W8A8Sm90Args& a, Fn&& fn) {
  const bool small = a.m <= kSmallM;
  if (a.out_dtype == kF16)
    return small ? fn(W8A8Gemm<cutlass::half_t, SmallTiles>{}) : fn(W8A8Gemm<cutlass::half_t, LargeTiles>{});
  return small ? fn(W8A8Gemm<cutlass::bfloat16_t, SmallTiles>{}) : fn(W8A8Gemm<cutlass::bfloat16_t, LargeTiles>{});
}

int64_t w8a8_sm90_workspace_bytes(int64_t m, int64_t n, int64_t kp, int out_dtype) {
  W8A8Sm90Args a{};
  a.m = m, a.n = n, a.kp = kp, a.out_dtype = out_dtype;
  if (m == 0 || n == 0) return 0;
  return sm90_workspace_bytes(a);
}

void w8a8_sm90_gemm_cuda(uintptr_t qa, uintptr_t sa, uintptr_t corr, uintptr_t w, uintptr_t sw, uintptr_t bias,
                         uintptr_t out, uintptr_t workspace, int64_t workspace_bytes, int64_t m, int64_t n,
                         int64_t kp, int out_dtype, uintptr_t stream) {
  const W8A8Sm90Args a{qa, sa, corr, w, sw, bias, out, m, n, kp, out_dtype};
  if (m == 0 || n == 0) return;
  sm90_launch(a, workspace, workspace_bytes, stream);
}

}  // namespace pyquant
