// GPTQ's sequential in-block column update on the GPU (experimental until a
// GPU run passes tests/algorithms/test_gptq_fused.py -m gpu).
//
// Spec: pyquant/algorithms/gptq.py::gptq_block_update_reference. For the
// columns i in [start, stop) of a block W (N x B), in order:
//   q = clamp(rint(w_i / s) + z, 0, maxq);  dq = (q - z) * s
//   e = (w_i - dq) / Hinv[i, i];  W[:, j] -= e * Hinv[i, j]  for j > i
//
// Rows are independent, so one warp owns kRows rows and the whole block width
// in registers: lane l holds columns l, l + 32, ... (kSlots of them) of each
// row, so W is read and written once and no __syncthreads is ever needed.
// Per column, the owner lane's values are gathered with shuffles onto lanes
// 0..kRows-1, which quantize one row each (one division chain per column
// instead of one per row on every lane), and the errors are shuffled back to
// all lanes for the rank-1 update of their columns. Hinv's row i is read with
// coalesced loads from L1/L2 (every warp of the grid walks the same rows).
//
// Rounding: the spec is a chain of torch ops, each rounded on its own, so the
// quantization uses __fdiv_rn (IEEE division even under --use_fast_math),
// rintf (half to even, as torch.round) and __fmul_rn/__fsub_rn/__fadd_rn,
// which nvcc never contracts into FMAs: a contracted w - (q - z) * s would
// round once instead of twice and could flip a code near a tie. The update
// itself is torch's addr_ (self + alpha * vec1 * vec2 in one expression, which
// nvcc contracts into fma(-e, h, w)), so it is written as that fma.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "cuda_common.cuh"
#include "launchers.h"

namespace pyquant {
namespace {

constexpr int kWarps = 4;  // warps per CTA; warps never synchronize, so this only sets the grid's granularity
constexpr unsigned kFull = 0xffffffffu;

struct GptqArgs {
  float* w;
  int64_t ldw;
  int64_t n;
  int b;
  const float* hinv;
  int64_t ldh;
  const float* scale;
  const float* zero;
  int64_t ldsz;
  int start, stop, group_len;
  float maxq;
  uint8_t* codes;
  int64_t ldc;
  float* err;
  int64_t lde;
};

template <int kSlots, int kRows>
__global__ void __launch_bounds__(kWarps * 32) gptq_block_kernel(const GptqArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t row0 = (int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * kRows;
  if (row0 >= a.n) return;  // uniform per warp: the shuffles below always see full warps

  float w[kRows][kSlots];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = row0 + r;
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int col = 32 * k + lane;
      w[r][k] = (row < a.n && col < a.b) ? a.w[row * a.ldw + col] : 0.0f;
    }
  }

  // Lane r < kRows quantizes row row0 + r.
  const int64_t my_row = row0 + lane;
  const bool quantizes = lane < kRows && my_row < a.n;
  const float* my_scale = a.scale + (quantizes ? my_row * a.ldsz : 0);
  const float* my_zero = a.zero + (quantizes ? my_row * a.ldsz : 0);
  uint8_t* my_codes = a.codes + (quantizes ? my_row * a.ldc : 0);
  float* my_err = a.err + (quantizes ? my_row * a.lde : 0);

#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    const int c0 = max(a.start, 32 * k), c1 = min(a.stop, 32 * k + 32);
    for (int i = c0; i < c1; ++i) {
      const float* hrow = a.hinv + int64_t(i) * a.ldh;
      // Loads that do not depend on the error chain go first so their latency overlaps it.
      const float d = __ldg(hrow + i);
      float h[kSlots];
#pragma unroll
      for (int kk = k; kk < kSlots; ++kk) {
        const int col = 32 * kk + lane;
        h[kk] = col < a.b ? __ldg(hrow + col) : 0.0f;
      }
      float wi = 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float v = __shfl_sync(kFull, w[r][k], i - 32 * k);
        if (lane == r) wi = v;
      }
      float e = 0.0f;
      if (quantizes) {
        const int g = (i - a.start) / a.group_len;
        const float s = my_scale[g], z = my_zero[g];
        const float q = fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(wi, s)), z), 0.0f), a.maxq);
        const float dq = __fmul_rn(__fsub_rn(q, z), s);
        e = __fdiv_rn(__fsub_rn(wi, dq), d);
        my_codes[i - a.start] = static_cast<uint8_t>(q);
        my_err[i - a.start] = e;
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float ne = -__shfl_sync(kFull, e, r);
        // Slot k holds columns on both sides of i; later slots only columns > i.
        if (32 * k + lane > i) w[r][k] = __fmaf_rn(ne, h[k], w[r][k]);
#pragma unroll
        for (int kk = k + 1; kk < kSlots; ++kk) w[r][kk] = __fmaf_rn(ne, h[kk], w[r][kk]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = row0 + r;
    if (row >= a.n) break;
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int col = 32 * k + lane;
      if (col < a.b) a.w[row * a.ldw + col] = w[r][k];
    }
  }
}

template <int kSlots, int kRows>
void launch(const GptqArgs& a, cudaStream_t stream) {
  const int64_t rows_per_cta = int64_t(kWarps) * kRows;
  const int64_t ctas = cuda::ceil_div(a.n, rows_per_cta);
  gptq_block_kernel<kSlots, kRows><<<static_cast<unsigned>(ctas), kWarps * 32, 0, stream>>>(a);
  PQ_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void gptq_block_update_cuda(uintptr_t w, int64_t ldw, int64_t n, int64_t b, uintptr_t hinv, int64_t ldh,
                            uintptr_t scale, uintptr_t zero, int64_t ldsz, int64_t start, int64_t stop,
                            int64_t group_len, int64_t maxq, uintptr_t codes, int64_t ldc, uintptr_t err,
                            int64_t lde, uintptr_t stream) {
  if (n < 0 || b < 1 || b > kGptqCudaMaxBlock || start < 0 || start > stop || stop > b || group_len < 1 ||
      maxq < 1 || maxq > 255 || ldw < b || ldh < b || ldsz < 1 || ldc < stop - start || lde < stop - start)
    throw std::invalid_argument("gptq_block_update_cuda: bad sizes (n=" + std::to_string(n) +
                                ", b=" + std::to_string(b) + ", start=" + std::to_string(start) +
                                ", stop=" + std::to_string(stop) + ", group_len=" + std::to_string(group_len) +
                                ", maxq=" + std::to_string(maxq) + ")");
  if (n == 0 || start == stop) return;
  if (!w || !hinv || !scale || !zero || !codes || !err)
    throw std::invalid_argument("gptq_block_update_cuda: null pointer");
  if (n > int64_t(0x7fffffff) * kWarps)
    throw std::invalid_argument("gptq_block_update_cuda: too many rows (" + std::to_string(n) + ")");
  GptqArgs a{reinterpret_cast<float*>(w),         ldw,
             n,                                   static_cast<int>(b),
             reinterpret_cast<const float*>(hinv), ldh,
             reinterpret_cast<const float*>(scale), reinterpret_cast<const float*>(zero),
             ldsz,                                static_cast<int>(start),
             static_cast<int>(stop),              static_cast<int>(group_len),
             static_cast<float>(maxq),            reinterpret_cast<uint8_t*>(codes),
             ldc,                                 reinterpret_cast<float*>(err),
             lde};
  auto s = reinterpret_cast<cudaStream_t>(stream);
  // Registers per lane: kRows * kSlots for W plus kSlots for the Hinv row; 4
  // rows per warp give N / 4 warps (1024 for N = 4096), enough to fill an
  // H100 with the latency-bound column chain; the widest blocks take 2.
  const int slots = static_cast<int>((b + 31) / 32);
  if (slots <= 1) launch<1, 4>(a, s);
  else if (slots <= 2) launch<2, 4>(a, s);
  else if (slots <= 4) launch<4, 4>(a, s);
  else if (slots <= 8) launch<8, 4>(a, s);
  else launch<16, 2>(a, s);
}

}  // namespace pyquant
