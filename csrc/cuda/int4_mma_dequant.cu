// IntMMA (pyquant/formats/int_mma.py) -> out (N, K) in out_dtype, bit-exact
// with IntMMA.decode: (q - z) * s in fp32, one rounding to the output dtype,
// columns scattered through perm with act-order. Experimental until a GPU run
// passes it (kernel "cuda_int4mma_dequantize"): the large-M path of an IntMMA
// weight (dequantize, then the vendor GEMM) without leaving the GPU.
//
// One thread per 16-byte lane slot of the layout: one 128-bit streaming load
// gives the lane's 32 codes (4 k16 steps x 8), which sit in two output rows
// (g and g+8 of the tile) at columns 2t, 2t+1, 2t+8, 2t+9 of each step. The
// scale (and zero) pair of those two rows is one 32-bit load (the layout keeps
// rows g and g+8 adjacent). Grid: (slots of a tile row, tiles): no division.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_check.h"
#include "cuda_common.cuh"
#include "launchers.h"
#include "pyquant/static_switch.h"

namespace pyquant {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxGridTiles = 65535;

struct MmaDequantParams {
  const uint4* qweight;
  const void* scales;  // (ngroups, np)
  const void* zeros;   // same, or nullptr: symmetric (zero point 8)
  const int* perm;     // (k,) or nullptr
  void* out;
  int n, k, np, tiles16, blocks64, ngroups, gshift;
  bool pairs;  // no perm and K even: two adjacent outputs per 32-bit (or 64-bit) store
};

template <typename S>
__device__ __forceinline__ float2 load_pair(const void* p, int i) {  // elements i, i+1
  const S* s = static_cast<const S*>(p) + i;
  return make_float2(cuda::to_float<S>(s[0]), cuda::to_float<S>(s[1]));
}

template <typename Out>
__device__ __forceinline__ void store2(Out* dst, float a, float b) {
  if constexpr (sizeof(Out) == 2) {
    Out v[2] = {cuda::from_float<Out>(a), cuda::from_float<Out>(b)};
    *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(v);
  } else {
    *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  }
}

// The lane slot's 32 outputs of tile `tile`. kPairs (no perm, K even): columns
// 2t, 2t+1 are adjacent and inside K together, one 32-bit (64-bit) store.
template <typename Out, typename S, bool kPairs>
__device__ __forceinline__ void dequant_slot(const MmaDequantParams& p, int tile, int kb, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const uint4 q = __ldcs(p.qweight + (tile * p.blocks64 + kb) * 32 + lane);
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
  const int row[2] = {tile * 16 + g, tile * 16 + g + 8};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int k0 = kb * 64 + 16 * j;
    if (k0 >= p.k) break;
    const int gi = min(k0 >> p.gshift, p.ngroups - 1);  // a step lies in one group (groups: multiples of 32)
    const float2 s = load_pair<S>(p.scales, gi * p.np + tile * 16 + 2 * g);
    const float2 z = p.zeros ? load_pair<S>(p.zeros, gi * p.np + tile * 16 + 2 * g) : make_float2(8.0f, 8.0f);
    float v[8];  // nibble i: row g + 8 (i & 1), column 2t + 8 ((i >> 1) & 1) + (i >> 2)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float code = float((words[j] >> (4 * i)) & 0xFu);
      v[i] = (i & 1) ? (code - z.y) * s.y : (code - z.x) * s.x;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (row[h] >= p.n) continue;
      Out* out_row = static_cast<Out*>(p.out) + size_t(row[h]) * p.k;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = k0 + 8 * c + 2 * t;
        const float a = v[h + 2 * c], b = v[h + 2 * c + 4];  // columns col, col + 1
        if constexpr (kPairs) {
          if (col < p.k) store2<Out>(out_row + col, a, b);
        } else {
          if (col < p.k) out_row[p.perm ? p.perm[col] : col] = cuda::from_float<Out>(a);
          if (col + 1 < p.k) out_row[p.perm ? p.perm[col + 1] : col + 1] = cuda::from_float<Out>(b);
        }
      }
    }
  }
}

template <typename Out, typename S>
__global__ void __launch_bounds__(kThreads) int4_mma_dequant_kernel(const MmaDequantParams p) {
  const int slot = blockIdx.x * kThreads + threadIdx.x;  // (layout block, lane) within a tile row
  if (slot >= p.blocks64 * 32) return;
  if (p.pairs) {
    for (int tile = blockIdx.y; tile < p.tiles16; tile += gridDim.y)
      dequant_slot<Out, S, true>(p, tile, slot >> 5, slot & 31);
  } else {
    for (int tile = blockIdx.y; tile < p.tiles16; tile += gridDim.y)
      dequant_slot<Out, S, false>(p, tile, slot >> 5, slot & 31);
  }
}

template <typename Out>
void launch_scales(const MmaDequantParams& p, int scale_dtype, dim3 grid, cudaStream_t s) {
  switch (scale_dtype) {
    case kF16: int4_mma_dequant_kernel<Out, __half><<<grid, kThreads, 0, s>>>(p); break;
    case kBF16: int4_mma_dequant_kernel<Out, __nv_bfloat16><<<grid, kThreads, 0, s>>>(p); break;
    default: int4_mma_dequant_kernel<Out, float><<<grid, kThreads, 0, s>>>(p); break;
  }
  PQ_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void int4_mma_dequant_cuda(uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t perm, uintptr_t out,
                           int64_t n, int64_t k, int64_t group, int scale_dtype, int out_dtype, uintptr_t stream) {
  if (n == 0 || k == 0) return;
  if (qweight % 16) throw std::invalid_argument("int4_mma_dequant_cuda: qweight must be 16-byte aligned");
  if (out % 8) throw std::invalid_argument("int4_mma_dequant_cuda: out must be 8-byte aligned");
  if (n * k >= (int64_t(1) << 31)) throw std::invalid_argument("int4_mma_dequant_cuda: N*K must stay below 2^31");
  MmaDequantParams p;
  p.qweight = reinterpret_cast<const uint4*>(qweight);
  p.scales = reinterpret_cast<const void*>(scales);
  p.zeros = reinterpret_cast<const void*>(zeros);
  p.perm = reinterpret_cast<const int*>(perm);
  p.out = reinterpret_cast<void*>(out);
  p.n = int(n);
  p.k = int(k);
  p.np = int(cuda::ceil_div(n, 16) * 16);
  p.tiles16 = p.np / 16;
  p.blocks64 = int(cuda::ceil_div(k, 64));
  p.ngroups = group == -1 ? 1 : int(cuda::ceil_div(k, group));
  p.gshift = cuda::group_shift(group, k);
  if (p.gshift < 0)
    throw std::invalid_argument("int4_mma_dequant_cuda: group size must be a power of two >= 32, got " +
                                std::to_string(group));
  p.pairs = perm == 0 && k % 2 == 0;
  const dim3 grid(unsigned(cuda::ceil_div(p.blocks64 * 32, kThreads)),
                  unsigned(std::min<int64_t>(p.tiles16, kMaxGridTiles)));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  PQ_DTYPE_SWITCH(out_dtype, scalar_t, "int4_mma_dequant_cuda",
                  [&] { launch_scales<scalar_t>(p, scale_dtype, grid, s); });
}

}  // namespace pyquant
