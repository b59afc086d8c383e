// GGUF block dequantization on the GPU (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the
// k-quants Q2_K..Q6_K), bit-exact with pyquant/ops/reference_gguf.py (and so
// with gguf-py). Experimental until a GPU run passes it.
//
// The bit handling is the shared header csrc/include/pyquant/gguf_blocks.h
// (also compiled into the CPU kernels and tested there); this file only maps
// threads to values. Exactness: each value is computed with the header's fp32
// operations in the header's order, with the products written as __fmul_rn
// (PQ_FMUL) so nvcc cannot contract "product - min" into an FMA.
//
// Access pattern: thread i owns 8 consecutive values of one block (a block's
// sub-blocks are 16 or 32 values, so the 8 share one scale): a warp covers one
// 256-value k-quant block (or eight 32-value legacy blocks), reading that
// block's bytes through L1 (blocks are 18..210 bytes at 2-byte alignment, so
// byte loads: a warp touches 1-2 lines per block) and writing 32 x 16 contiguous
// bytes of fp16/bf16 (128-bit stores). Rows are whole numbers of blocks, so the
// flat value index is block * block_size + offset.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda_check.h"
#include "cuda_common.cuh"
#include "launchers.h"
#include "pyquant/gguf_blocks.h"
#include "pyquant/static_switch.h"

namespace pyquant {
namespace {

using namespace gguf;

constexpr int kThreads = 256;

// Values i0..i0+7 of block b (i0 a multiple of 8), as gguf_blocks.h's
// dequant_block_* compute them.
template <int TYPE>
__device__ __forceinline__ void decode8(const uint8_t* b, int i0, float* v) {
  if constexpr (TYPE == kQ4_0) {
    const float d = load_f16(b + LayoutQ4_0::kD);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = PQ_FMUL(d, float(nibble32(b + LayoutQ4_0::kQs, i0 + j) - 8));
  } else if constexpr (TYPE == kQ4_1) {
    const float d = load_f16(b + LayoutQ4_1::kD), m = load_f16(b + LayoutQ4_1::kM);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = PQ_FMUL(d, float(nibble32(b + LayoutQ4_1::kQs, i0 + j))) + m;
  } else if constexpr (TYPE == kQ5_0) {
    const float d = load_f16(b + LayoutQ5_0::kD);
#pragma unroll
    for (int j = 0; j < 8; ++j)
      v[j] = PQ_FMUL(d, float(q5_code(b + LayoutQ5_0::kQh, b + LayoutQ5_0::kQs, i0 + j) - 16));
  } else if constexpr (TYPE == kQ5_1) {
    const float d = load_f16(b + LayoutQ5_1::kD), m = load_f16(b + LayoutQ5_1::kM);
#pragma unroll
    for (int j = 0; j < 8; ++j)
      v[j] = PQ_FMUL(d, float(q5_code(b + LayoutQ5_1::kQh, b + LayoutQ5_1::kQs, i0 + j))) + m;
  } else if constexpr (TYPE == kQ8_0) {
    const float d = load_f16(b + LayoutQ8_0::kD);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = PQ_FMUL(float(static_cast<int8_t>(b[LayoutQ8_0::kQs + i0 + j])), d);
  } else if constexpr (TYPE == kQ2_K) {
    const float d = load_f16(b + LayoutQ2_K::kD), dmin = load_f16(b + LayoutQ2_K::kDmin);
    const int s = b[LayoutQ2_K::kScales + i0 / 16];
    const float dl = PQ_FMUL(d, float(s & 0xF)), ml = PQ_FMUL(dmin, float(s >> 4));
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = PQ_FMUL(dl, float(k_2bit(b + LayoutQ2_K::kQs, i0 + j))) - ml;
  } else if constexpr (TYPE == kQ3_K) {
    const float d = load_f16(b + LayoutQ3_K::kD);
    const float dl = PQ_FMUL(d, float(q3k_scale(b + LayoutQ3_K::kScales, i0 / 16)));
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = PQ_FMUL(dl, float(q3k_code(b, i0 + j)));
  } else if constexpr (TYPE == kQ4_K || TYPE == kQ5_K) {
    using L = typename std::conditional<TYPE == kQ4_K, LayoutQ4_K, LayoutQ5_K>::type;
    const float d = load_f16(b + L::kD), dmin = load_f16(b + L::kDmin);
    int sc, mn;
    k_scale_min(b + L::kScales, i0 / 32, sc, mn);
    const float dl = PQ_FMUL(d, float(sc)), ml = PQ_FMUL(dmin, float(mn));
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      int q;
      if constexpr (TYPE == kQ4_K) {
        q = q4k_code(b + LayoutQ4_K::kQs, i0 + j);
      } else {
        q = q5k_code(b + LayoutQ5_K::kQh, b + LayoutQ5_K::kQs, i0 + j);
      }
      v[j] = PQ_FMUL(dl, float(q)) - ml;
    }
  } else {
    static_assert(TYPE == kQ6_K, "unhandled GGUF type");
    const float d = load_f16(b + LayoutQ6_K::kD);
    const float dl = PQ_FMUL(d, float(static_cast<int8_t>(b[LayoutQ6_K::kScales + i0 / 16])));
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = PQ_FMUL(dl, float(q6k_code(b, i0 + j)));
  }
}

template <int TYPE, typename T>
__global__ void __launch_bounds__(kThreads) gguf_dequant_kernel(const uint8_t* __restrict__ blocks,
                                                                 T* __restrict__ out, int64_t nblocks) {
  constexpr int kBlock = block_size(TYPE);
  constexpr int kOctets = kBlock / 8;
  const int64_t o = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (o >= nblocks * kOctets) return;
  const int64_t blk = o / kOctets;
  const int i0 = int(o % kOctets) * 8;
  float v[8];
  decode8<TYPE>(blocks + blk * type_size(TYPE), i0, v);
  cuda::store8(out + blk * kBlock + i0, v);
}

template <int TYPE>
void launch_type(const uint8_t* blocks, void* out, int64_t nblocks, int out_dtype, cudaStream_t s) {
  const int64_t octets = nblocks * (block_size(TYPE) / 8);
  const int64_t grid = cuda::ceil_div(octets, kThreads);
  PQ_DTYPE_SWITCH(out_dtype, scalar_t, "gguf_dequant_cuda", [&] {
    gguf_dequant_kernel<TYPE, scalar_t><<<grid, kThreads, 0, s>>>(blocks, static_cast<scalar_t*>(out), nblocks);
    PQ_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace

void gguf_dequant_cuda(uintptr_t blocks, uintptr_t out, int64_t nblocks, int type, int out_dtype, uintptr_t stream) {
  if (!valid_type(type)) throw std::invalid_argument("gguf_dequant_cuda: unknown GGUF type " + std::to_string(type));
  if (out % 16) throw std::invalid_argument("gguf_dequant_cuda: out must be 16-byte aligned");
  if (nblocks == 0) return;
  auto b = reinterpret_cast<const uint8_t*>(blocks);
  auto o = reinterpret_cast<void*>(out);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (type) {
    case kQ4_0: launch_type<kQ4_0>(b, o, nblocks, out_dtype, s); break;
    case kQ4_1: launch_type<kQ4_1>(b, o, nblocks, out_dtype, s); break;
    case kQ5_0: launch_type<kQ5_0>(b, o, nblocks, out_dtype, s); break;
    case kQ5_1: launch_type<kQ5_1>(b, o, nblocks, out_dtype, s); break;
    case kQ8_0: launch_type<kQ8_0>(b, o, nblocks, out_dtype, s); break;
    case kQ2_K: launch_type<kQ2_K>(b, o, nblocks, out_dtype, s); break;
    case kQ3_K: launch_type<kQ3_K>(b, o, nblocks, out_dtype, s); break;
    case kQ4_K: launch_type<kQ4_K>(b, o, nblocks, out_dtype, s); break;
    case kQ5_K: launch_type<kQ5_K>(b, o, nblocks, out_dtype, s); break;
    default: launch_type<kQ6_K>(b, o, nblocks, out_dtype, s);
  }
}

}  // namespace pyquant
