// W8A8: dynamic per-token int8 activations times per-channel int8 weights on
// the int8 tensor cores (mma.sync m16n8k32 s8.s8.s32, sm_80+). Experimental
// until a GPU run passes it. The spec is pyquant.ops.reference.w8a8_matmul_reference.
//
// Weights are Int(8, per-channel, symmetric) codes: unsigned bytes with the
// implicit zero point 128. code - 128 == (int8)(code ^ 0x80), so the kernel
// converts 4 codes to signed int8 with one XOR on each 32-bit fragment
// register after it leaves shared memory: no repacked copy of the weight.
// Padding codes (columns K..Kp-1 of a row) are 0, i.e. -128 after the XOR;
// the activation quantizer writes 0 there, so they add nothing.
//
// GEMM tiling (128 threads = 4 warps, 2 x 2):
//   block tile 64 tokens x 128 weight rows x 64 k-bytes, warp tile 32 x 64
//   = 2 (m16) x 8 (n8) mma tiles, int32 accumulators in registers (exact).
//   Tiles move global -> shared with 16-byte cp.async (L2 only, .cg), three
//   stages deep so two tiles are in flight while one is multiplied; rows past
//   M/N and columns past Kp are zero-filled by the copy itself (src-size 0).
//   Shared rows are padded from 64 to 80 bytes: the fragment loads below are
//   32-bit loads of (row g, bytes 4t) for g = lane/4, t = lane%4, whose words
//   (20 g + t) mod 32 are 32 distinct banks.
// Fragment layouts (PTX ISA, mma.m16n8k32 with .s8):
//   A (16x32, row-major): a0 = (row g, k 4t..4t+3), a1 = (g+8, 4t..), a2 = (g, 16+4t..), a3 = (g+8, 16+4t..)
//   B (32x8, "col" = W rows): b0 = (n g, k 4t..4t+3), b1 = (n g, k 16+4t..)
//   C (16x8): c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t, 2t+1)
// Epilogue: y = (float(acc) * sa[m]) * sw[n] (+ bias[n]) with explicit
// round-to-nearest ops (no FMA contraction), the reference's fp32 op order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_check.h"
#include "cuda_common.cuh"
#include "launchers.h"
#include "pyquant/static_switch.h"

namespace pyquant {
namespace {

using cuda::from_float;
using cuda::to_float;

// ---------------------------------------------------------------------------
// Per-token activation quantization: one block of 256 threads per row.
// Memory-light next to the GEMM (M x K reads), so it favours simplicity:
// coalesced scalar loads (x rows have any alignment), a block max-reduction,
// then a second pass (served from L1/L2) that writes the int8 codes.
constexpr int kQuantThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_rows_int8_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ scale, int64_t k,
                              int64_t kp) {
  __shared__ float red[kQuantThreads / 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * k;
  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < k; i += kQuantThreads) amax = fmaxf(amax, fabsf(to_float(xr[i])));
  amax = cuda::warp_max(amax);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = red[0];
#pragma unroll
  for (int i = 1; i < kQuantThreads / 32; ++i) amax = fmaxf(amax, red[i]);

  const float s = __fdiv_rn(amax, 127.0f);
  if (threadIdx.x == 0) scale[row] = s;
  int8_t* qr = q + row * kp;
  for (int64_t i = threadIdx.x; i < kp; i += kQuantThreads) {
    int v = 0;
    if (i < k && s > 0.0f) {
      const float r = rintf(__fdiv_rn(to_float(xr[i]), s));  // round half to even, as torch.round
      v = int(fminf(fmaxf(r, -127.0f), 127.0f));
    }
    qr[i] = int8_t(v);
  }
}

// ---------------------------------------------------------------------------
// int8 GEMM.
constexpr int kBM = 64, kBN = 128, kBK = 64;
constexpr int kStages = 3;
constexpr int kGemmThreads = 128;
constexpr int kRowPitch = kBK + 16;  // bytes per shared row (bank spread, keeps 16-byte alignment)
constexpr int kWarpM = 32, kWarpN = 64;
constexpr int kMT = kWarpM / 16, kNT = kWarpN / 8;
constexpr int kStageA = kBM * kRowPitch, kStageB = kBN * kRowPitch;
static_assert(kStages * (kStageA + kStageB) <= 48 * 1024, "static shared memory limit");

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: write 16 zero bytes, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t lds32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

struct GemmParams {
  const int8_t* qa;
  const float* sa;
  const uint8_t* w;
  const void* sw;
  const void* bias;
  void* out;
  int64_t m, n, kp;
  int scale_dtype, bias_dtype;
};

// Global -> shared copy of k-tile kt into stage buffers (As, Bs).
__device__ __forceinline__ void load_tile(const GemmParams& p, uint8_t* As, uint8_t* Bs, int64_t bm0, int64_t bn0,
                                          int64_t kt) {
  const int64_t k0 = kt * kBK;
  constexpr int kChunksPerRow = kBK / 16;  // 4
#pragma unroll
  for (int i = 0; i < kBM * kChunksPerRow / kGemmThreads; ++i) {  // 2
    const int c = threadIdx.x + i * kGemmThreads;
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 16;
    const int64_t gr = bm0 + r, gk = k0 + col;
    const bool ok = gr < p.m && gk < p.kp;
    cp_async16(As + r * kRowPitch + col, ok ? p.qa + gr * p.kp + gk : p.qa, ok);
  }
#pragma unroll
  for (int i = 0; i < kBN * kChunksPerRow / kGemmThreads; ++i) {  // 4
    const int c = threadIdx.x + i * kGemmThreads;
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 16;
    const int64_t gr = bn0 + r, gk = k0 + col;
    const bool ok = gr < p.n && gk < p.kp;
    cp_async16(Bs + r * kRowPitch + col, ok ? p.w + gr * p.kp + gk : p.w, ok);
  }
}

template <typename T>
__global__ void __launch_bounds__(kGemmThreads) w8a8_gemm_kernel(const GemmParams p) {
  __shared__ __align__(16) uint8_t smem[kStages * (kStageA + kStageB)];
  uint8_t* As = smem;
  uint8_t* Bs = smem + kStages * kStageA;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int wm0 = (warp / 2) * kWarpM, wn0 = (warp % 2) * kWarpN;
  const int64_t bm0 = int64_t(blockIdx.y) * kBM, bn0 = int64_t(blockIdx.x) * kBN;
  const int64_t ktiles = (p.kp + kBK - 1) / kBK;

  int acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_tile(p, As + s * kStageA, Bs + s * kStageB, bm0, bn0, s);
    cp_async_commit();  // always commit so group counting stays uniform
  }

  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed (for this thread's copies)
    __syncthreads();               // ... for everyone's, and stage (kt-1) % kStages is free
    const int64_t nk = kt + kStages - 1;
    if (nk < ktiles) load_tile(p, As + (nk % kStages) * kStageA, Bs + (nk % kStages) * kStageB, bm0, bn0, nk);
    cp_async_commit();

    const uint8_t* a_s = As + (kt % kStages) * kStageA;
    const uint8_t* b_s = Bs + (kt % kStages) * kStageB;
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {
      uint32_t a[kMT][4], b[kNT][2];
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
        const uint8_t* base = a_s + (wm0 + i * 16 + g) * kRowPitch + ks * 32 + 4 * t;
        a[i][0] = lds32(base);
        a[i][1] = lds32(base + 8 * kRowPitch);
        a[i][2] = lds32(base + 16);
        a[i][3] = lds32(base + 8 * kRowPitch + 16);
      }
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const uint8_t* base = b_s + (wn0 + j * 8 + g) * kRowPitch + ks * 32 + 4 * t;
        b[j][0] = lds32(base) ^ 0x80808080u;  // unsigned code -> signed (code - 128)
        b[j][1] = lds32(base + 16) ^ 0x80808080u;
      }
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j) mma_s8(acc[i][j], a[i], b[j]);
    }
  }
  cp_async_wait<0>();

  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < kMT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows g and g + 8 of the m16 tile
      const int64_t row = bm0 + wm0 + i * 16 + g + 8 * h;
      if (row >= p.m) continue;
      const float sa = p.sa[row];
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t col = bn0 + wn0 + j * 8 + 2 * t + e;
          if (col >= p.n) continue;
          float y = __fmul_rn(__fmul_rn(__int2float_rn(acc[i][j][2 * h + e]), sa), load_float(p.sw, col, p.scale_dtype));
          if (p.bias) y = __fadd_rn(y, load_float(p.bias, col, p.bias_dtype));
          out[row * p.n + col] = from_float<T>(y);
        }
      }
    }
  }
}

}  // namespace

void quantize_rows_int8_cuda(uintptr_t x, uintptr_t q, uintptr_t scale, int64_t m, int64_t k, int64_t kp,
                             int x_dtype, uintptr_t stream) {
  if (m == 0) return;
  if (m > 0x7fffffff) throw std::invalid_argument("quantize_rows_int8_cuda: too many rows");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto qp = reinterpret_cast<int8_t*>(q);
  auto sp = reinterpret_cast<float*>(scale);
  const dim3 grid(static_cast<unsigned>(m));
  PQ_DTYPE_SWITCH(x_dtype, scalar_t, "quantize_rows_int8_cuda", [&] {
    quantize_rows_int8_kernel<<<grid, kQuantThreads, 0, s>>>(reinterpret_cast<const scalar_t*>(x), qp, sp, k, kp);
    PQ_CUDA_CHECK(cudaGetLastError());
  });
}

void w8a8_gemm_cuda(uintptr_t qa, uintptr_t sa, uintptr_t w, uintptr_t sw, uintptr_t bias, uintptr_t out, int64_t m,
                    int64_t n, int64_t kp, int scale_dtype, int bias_dtype, int out_dtype, uintptr_t stream) {
  if (m == 0 || n == 0) return;
  if (kp % 32) throw std::invalid_argument("w8a8_gemm_cuda: kp must be a multiple of 32");
  if (qa % 16 || w % 16) throw std::invalid_argument("w8a8_gemm_cuda: int8 operands must be 16-byte aligned");
  GemmParams p;
  p.qa = reinterpret_cast<const int8_t*>(qa);
  p.sa = reinterpret_cast<const float*>(sa);
  p.w = reinterpret_cast<const uint8_t*>(w);
  p.sw = reinterpret_cast<const void*>(sw);
  p.bias = reinterpret_cast<const void*>(bias);
  p.out = reinterpret_cast<void*>(out);
  p.m = m;
  p.n = n;
  p.kp = kp;
  p.scale_dtype = scale_dtype;
  p.bias_dtype = bias_dtype;
  const int64_t gx = cuda::ceil_div(n, kBN), gy = cuda::ceil_div(m, kBM);
  if (gy > 65535) throw std::invalid_argument("w8a8_gemm_cuda: M too large (more than 65535 * 64 rows)");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  PQ_DTYPE_SWITCH(out_dtype, scalar_t, "w8a8_gemm_cuda", [&] {
    w8a8_gemm_kernel<scalar_t><<<grid, kGemmThreads, 0, s>>>(p);
    PQ_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace pyquant
