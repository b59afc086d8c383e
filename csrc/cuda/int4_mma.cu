// INT4 weight-only matmul on tensor cores for M <= 64 activation rows:
// y = x @ W_hat^T + bias, W_hat = (q - z) * s per group, weights in the mma
// layout of pyquant/formats/int_mma.py (IntMMA). Experimental until a GPU run
// passes it (kernel "cuda_int4mma_qmatmul").
//
// Design (decode and small batches are bound by the weight stream)
// ------------------------------------------------------------------
// * Orientation. The kernel computes y^T = W x^T with mma.sync.m16n8k16: W is
//   the 16x16 A operand (16 output rows x 16 k), x^T the 16x8 B operand, so up
//   to 8 activation rows share one B tile and M = 1 wastes 7/8, not 15/16, of
//   the tensor work. M is padded to MT tiles of 8 (MT = 1, 2, 4, 8).
// * Weight stream. The layout stores, per 16 rows x 64 k, 32 lanes x 16 bytes:
//   lane l's four words are its A fragments for four k16 steps. A multi-stage
//   cp.async pipeline (kStages deep, 16-byte copies, L2 evict-first policy: no
//   weight byte is read twice) fills shared memory; each lane reads its words
//   back with one 128-bit load per 32 codes. Copies past the end of a tensor
//   are zero-fills (src-size 0), so ragged N and K need no branch and read
//   nothing out of bounds.
// * Codes to fp16 in registers, two per instruction. Masking nibbles into the
//   low bits of a 16-bit half (exponent field 0) gives the fp16 subnormal
//   q * 2^-24 (bits 0-3) or q * 2^-20 (bits 4-7), exactly: the fp16 spacing is
//   2^-24 below 2^-13, so the "magic exponent" is 0 and no offset has to be
//   subtracted. Per 8 codes: 4 masks (LOP3) and 1 shift, no conversion unit.
//   bf16 has too few mantissa bits for that (its subnormals times x underflow
//   fp32), so there the classic magic 0x4300 | q = 128 + q is used (3 shifts,
//   4 LOP3) and the offset 128 joins the zero point below.
// * Scales and zero points out of the inner loop. Per group g the tensor
//   cores accumulate P = sum_k x_k c_k (c = the decoded code, exact) into
//   fresh accumulators, and X = sum_k x_k with one extra mma per k16 step whose
//   A operand is constant (the decoded value of code 1 in every lane: 2^-24 /
//   2^-20 for the two fp16 row halves, 1.0 for bf16). At the end of the group
//   each accumulator gets y += s * P - s * (z + offset) * X: two FFMA per
//   accumulator per group, in fp32, for any scale or (even non-integral) zero.
//   The inner loop is mask, shift, mma; the fp16 row scales 2^24 / 2^20 are
//   applied once in the epilogue.
// * All SMs busy. The grid is (N / 128 column blocks) x (splits of K); the
//   host picks the splits so the grid fills the GPU several times over. Each
//   split writes fp32 partials to a workspace; the last CTA of a column block
//   (an atomic ticket) sums them in split order, so the result does not depend
//   on which CTA finished first, then resets its ticket for the next launch.
//   No other synchronization, nothing allocated: CUDA-graph safe.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "cuda_common.cuh"
#include "launchers.h"
#include "ptx.cuh"
#include "pyquant/common.h"

namespace pyquant {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kStageK = 128;        // k per pipeline stage
constexpr int kSteps = kStageK / 16;  // k16 steps per stage
constexpr int kLayoutBlockK = 64;   // k per 512-byte layout block
constexpr int kStages = 4;          // cp.async pipeline depth
constexpr int kXRowBytes = kStageK * 2;  // one x row of a stage (16-bit x)
constexpr int kXChunksPerRow = kXRowBytes / 16;

struct MmaParams {
  const void* x;         // (m, k) 16-bit, rows 16-byte aligned, k % 8 == 0
  const uint4* qweight;  // (np/16, kp*8) bytes
  const void* scales;    // (ngroups, np) fp16/bf16
  const void* zeros;     // same, or nullptr: symmetric (zero point 8)
  const void* bias;      // (n,) or nullptr
  void* out;             // (m, n) in x's dtype
  float* ws;             // (splits, m, n) fp32 partials when splits > 1
  int* tickets;          // one per column block, 0 on entry and on exit
  int m, n, k;
  int np, tiles16, blocks64;  // padded rows, n16 tiles, k64 layout blocks
  int ngroups, gshift;        // group of column c = c >> gshift
  int stages_total, stages_per_split, splits;
  int bias_dtype;
};

// Tile shape and shared-memory map of one instantiation. MT tiles of 8
// activation rows; FP k16 steps per scale period (a group, or a whole stage
// when groups are longer); TW n16 tiles per warp (1 at MT = 8 to stay within
// 255 registers).
template <int MT, int FP>
struct Cfg {
  static constexpr int TW = MT <= 2 ? (FP >= 4 ? 4 : 2) : MT == 4 ? (FP >= 4 ? 2 : 1) : 1;
  static constexpr int kBlockN = kWarps * TW * 16;
  static constexpr int kW = kBlockN * kStageK / 2;            // code bytes per stage
  static constexpr int kWPerThread = kW / 16 / kThreads;       // 16-byte copies
  static constexpr int kXPerThread = MT * 8 * kXChunksPerRow / kThreads;
  static constexpr int kX = MT * 8 * kXRowBytes;
  static constexpr int kPeriods = kSteps / FP;
  static constexpr int kSChunks = kPeriods * kBlockN * 2 / 16;  // per tensor (scales, zeros)
  static constexpr int kS = kSChunks * 16;
  static constexpr int kStage = kW + kX + 2 * kS;
  static constexpr int kTotal = kStages * kStage;
  // CTAs per SM the shared memory allows (164 KB on A100, the smaller of A100
  // and H100), at most 2, told to ptxas: it then keeps per-thread offsets in
  // registers (up to 255) instead of recomputing them in the main loop.
  static constexpr int kSmemBlocks = (164 * 1024) / kTotal;
  static constexpr int kMinBlocks = kSmemBlocks < 1 ? 1 : kSmemBlocks > 2 ? 2 : kSmemBlocks;
  static_assert(kW % (16 * kThreads) == 0 && MT * 8 * kXChunksPerRow % kThreads == 0, "whole copies per thread");
  static_assert(2 * kSChunks <= kThreads, "one scale copy per thread at most");
};

// How a 32-bit word of the layout becomes the four A registers of one k16 step.
template <typename T>
struct Decode;

template <>
struct Decode<__half> {
  static constexpr bool kBf16 = false;
  // Code 1 decoded, per register: rows g (a0, a2) hold q * 2^-24, rows g+8 q * 2^-20.
  static constexpr uint32_t kOneLo = 0x00010001u, kOneHi = 0x00100010u;
  static constexpr bool kHasOffset = false;
  static constexpr float kOffset = 0.0f;
  static constexpr float kUnscaleLo = 16777216.0f, kUnscaleHi = 1048576.0f;  // 2^24, 2^20
  static __device__ __forceinline__ void run(uint32_t w, uint32_t (&a)[4]) {
    a[0] = w & 0x000f000fu;
    a[1] = w & 0x00f000f0u;
    const uint32_t v = w >> 8;
    a[2] = v & 0x000f000fu;
    a[3] = v & 0x00f000f0u;
  }
};

template <>
struct Decode<__nv_bfloat16> {
  static constexpr bool kBf16 = true;
  static constexpr uint32_t kOneLo = 0x3f803f80u, kOneHi = 0x3f803f80u;  // 1.0
  static constexpr bool kHasOffset = true;
  static constexpr float kOffset = 128.0f;  // 0x4300 | q = 128 + q
  static constexpr float kUnscaleLo = 1.0f, kUnscaleHi = 1.0f;
  static __device__ __forceinline__ void run(uint32_t w, uint32_t (&a)[4]) {
    a[0] = cuda::and_or<0x000f000fu, 0x43004300u>(w);
    a[1] = cuda::and_or<0x000f000fu, 0x43004300u>(w >> 4);
    a[2] = cuda::and_or<0x000f000fu, 0x43004300u>(w >> 8);
    a[3] = cuda::and_or<0x000f000fu, 0x43004300u>(w >> 12);
  }
};

// Two 16-bit scales (rows g and g+8 of a lane's accumulators) -> floats.
__device__ __forceinline__ float2 scale_pair(uint32_t v, __half*) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}
__device__ __forceinline__ float2 scale_pair(uint32_t v, __nv_bfloat16*) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}

// Per-thread source offsets, bounds and destinations of the copies, computed
// once and advanced by one stage per load(): a stage then costs an add, a
// wide multiply-add and a compare per 16-byte copy. A copy whose offset has
// reached its bound zero-fills instead of reading.
template <int MT, int FP>
struct Copier {
  using C = Cfg<MT, FP>;
  uint32_t w_off[C::kWPerThread];  // uint4 index into qweight
  uint32_t w_end[C::kWPerThread];  // end of this copy's n16 tile row (0: tile past N)
  uint32_t x_off[C::kXPerThread];  // element index into x
  uint32_t x_end[C::kXPerThread];  // end of this copy's x row (0: row past M)
  uint32_t x_dst[C::kXPerThread];  // swizzled byte offset within the stage's x tile
  uint32_t s_k;                    // first k of this thread's scale period in the next stage
  uint32_t s_col;                  // its first column (np: nothing to copy)

  __device__ __forceinline__ Copier(const MmaParams& p, int st0) {
    const int tid = threadIdx.x;
    const int block = (tid >> 5) & 1;  // layout block (of 64 k) within a stage
#pragma unroll
    for (int i = 0; i < C::kWPerThread; ++i) {
      const int c = tid + i * kThreads;
      const uint32_t tile = blockIdx.x * (C::kBlockN / 16) + (c >> 6);
      const uint32_t row0 = tile * p.blocks64 * 32u;
      w_off[i] = row0 + (st0 * (kStageK / kLayoutBlockK) + block) * 32u + (c & 31);
      w_end[i] = tile < uint32_t(p.tiles16) ? row0 + p.blocks64 * 32u : 0u;
      cuda::keep_in_register(w_off[i]);
      cuda::keep_in_register(w_end[i]);
    }
#pragma unroll
    for (int i = 0; i < C::kXPerThread; ++i) {
      const int c = tid + i * kThreads;
      const int r = c / kXChunksPerRow, cc = c % kXChunksPerRow;
      x_off[i] = uint32_t(r) * p.k + st0 * kStageK + cc * 8;
      x_end[i] = r < p.m ? uint32_t(r + 1) * p.k : 0u;
      x_dst[i] = r * kXRowBytes + ((cc ^ (r & 7)) * 16);
      cuda::keep_in_register(x_off[i]);
      cuda::keep_in_register(x_end[i]);
      cuda::keep_in_register(x_dst[i]);
    }
    // Threads [0, kSChunks) copy scales, [kSChunks, 2 kSChunks) zeros (if any).
    const int cs = tid % C::kSChunks;
    const int per_period = C::kBlockN * 2 / 16;
    const bool active = tid < 2 * C::kSChunks && (tid < C::kSChunks || p.zeros != nullptr);
    const int col = blockIdx.x * C::kBlockN + (cs % per_period) * 8;
    s_col = active && col < p.np ? col : p.np;
    s_k = st0 * kStageK + (cs / per_period) * FP * 16;
    cuda::keep_in_register(s_col);
    cuda::keep_in_register(s_k);
  }

  // Issues the copies of the next stage into the stage buffer at shared
  // address `dst`; with `live` false (past the split's last stage) nothing.
  __device__ __forceinline__ void load(const MmaParams& p, uint32_t dst, bool live, uint64_t policy) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < C::kWPerThread; ++i) {
      cuda::cp_async16_policy_if(live, dst + (tid + i * kThreads) * 16, p.qweight + w_off[i], w_off[i] < w_end[i],
                                 policy);
      w_off[i] += (kStageK / kLayoutBlockK) * 32;
    }
    const uint16_t* x = static_cast<const uint16_t*>(p.x);
#pragma unroll
    for (int i = 0; i < C::kXPerThread; ++i) {
      cuda::cp_async16_if(live, dst + C::kW + x_dst[i], x + x_off[i], x_off[i] < x_end[i]);
      x_off[i] += kStageK;
    }
    const uint32_t gi = s_k >> p.gshift;
    const bool s_ok = gi < uint32_t(p.ngroups);
    const uint16_t* s_src = static_cast<const uint16_t*>(tid < C::kSChunks ? p.scales : p.zeros);
    cuda::cp_async16_if(live && s_col < uint32_t(p.np), dst + C::kW + C::kX + tid * 16,
                        s_src + (s_ok ? gi * p.np + s_col : 0u), s_ok);
    s_k += kStageK;
  }
};

template <typename T, typename TS, int MT, int FP>
__global__ void __launch_bounds__(kThreads, Cfg<MT, FP>::kMinBlocks) int4_mma_kernel(const MmaParams p) {
  using D = Decode<T>;
  using C = Cfg<MT, FP>;
  constexpr int TW = C::TW;
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int last_cta;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int st_begin = blockIdx.y * p.stages_per_split;
  const int nst = min(p.stages_per_split, p.stages_total - st_begin);  // >= 1 (host)
  const uint64_t policy = cuda::evict_first_policy();
  Copier<MT, FP> copier(p, st_begin);
  const uint32_t smem0 = cuda::smem_u32(smem);

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    copier.load(p, smem0 + s * C::kStage, s < nst, policy);
    cuda::cp_async_commit();
  }

  float acc[TW][MT][4];  // sum x * code over the current group
  float xsum[MT][4];     // sum x over the current group (scaled like a code of 1)
  float y[TW][MT][4];
#pragma unroll
  for (int j = 0; j < TW; ++j)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 4; ++r) y[j][mt][r] = 0.0f;

  uint32_t ones[4] = {D::kOneLo, D::kOneHi, D::kOneLo, D::kOneHi};
#pragma unroll
  for (int r = 0; r < 4; ++r) cuda::keep_in_register(ones[r]);
  const bool asym = p.zeros != nullptr;
  // Shared-memory offsets of this lane within a stage buffer.
  uint32_t w_rd = ((warp * TW * 2) * 32 + lane) * 16;  // + (j * 2 + q) * 512
  uint32_t s_rd = C::kW + C::kX + ((warp * TW) * 8 + lane / 4) * 4;  // + j * 32 + f * kBlockN * 2
  // ldmatrix address of step pair s2: row lane % 8, 16-byte column
  // (2 * s2 + lane / 8) ^ (lane % 8) (the copies' swizzle) = that of pair 0
  // XOR 4 * s2 * 16, since lane / 8 < 4 and the row offset is 256-aligned.
  uint32_t x_rd = C::kW + (lane & 7) * kXRowBytes + (((lane >> 3) ^ (lane & 7)) * 16);
  cuda::keep_in_register(w_rd);
  cuda::keep_in_register(s_rd);
  cuda::keep_in_register(x_rd);

  for (int i = 0; i < nst; ++i) {
    cuda::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage i landed for every thread; stage i-1's buffer is free
    const int nxt = i + kStages - 1;
    copier.load(p, smem0 + (nxt % kStages) * C::kStage, nxt < nst, policy);
    cuda::cp_async_commit();

    const uint32_t base = smem0 + (i % kStages) * C::kStage;
    uint4 wq[TW][2];
#pragma unroll
    for (int j = 0; j < TW; ++j)
#pragma unroll
      for (int q = 0; q < 2; ++q) wq[j][q] = cuda::lds128(base + w_rd + (j * 2 + q) * 512);

#pragma unroll
    for (int s2 = 0; s2 < kSteps; s2 += 2) {
      uint32_t b[MT][4];  // B fragments of steps s2 (b[.][0..1]) and s2+1 (b[.][2..3])
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        cuda::ldmatrix_x4(b[mt], base + (x_rd ^ (s2 * 32)) + mt * 8 * kXRowBytes);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int s = s2 + h;
        const bool fresh = s % FP == 0;
#pragma unroll
        for (int j = 0; j < TW; ++j) {
          const uint4& v = wq[j][s / 4];
          const uint32_t w = (s % 4 == 0) ? v.x : (s % 4 == 1) ? v.y : (s % 4 == 2) ? v.z : v.w;
          uint32_t a[4];
          D::run(w, a);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            if (fresh)
              cuda::mma_16816<D::kBf16, true>(acc[j][mt], a, b[mt][2 * h], b[mt][2 * h + 1]);
            else
              cuda::mma_16816<D::kBf16, false>(acc[j][mt], a, b[mt][2 * h], b[mt][2 * h + 1]);
          }
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if (fresh)
            cuda::mma_16816<D::kBf16, true>(xsum[mt], ones, b[mt][2 * h], b[mt][2 * h + 1]);
          else
            cuda::mma_16816<D::kBf16, false>(xsum[mt], ones, b[mt][2 * h], b[mt][2 * h + 1]);
        }
        if (s % FP == FP - 1) {  // end of a group (or of the stage): fold in its scales and zeros
          const int f = s / FP;
#pragma unroll
          for (int j = 0; j < TW; ++j) {
            const uint32_t sp = base + s_rd + j * 32 + f * C::kBlockN * 2;
            const float2 sv = scale_pair(cuda::lds32(sp), static_cast<TS*>(nullptr));
            float2 zv = asym ? scale_pair(cuda::lds32(sp + C::kS), static_cast<TS*>(nullptr)) : make_float2(8.0f, 8.0f);
            if (D::kHasOffset) zv = make_float2(zv.x + D::kOffset, zv.y + D::kOffset);
            const float nzs_lo = -sv.x * zv.x, nzs_hi = -sv.y * zv.y;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              y[j][mt][0] = fmaf(sv.x, acc[j][mt][0], fmaf(nzs_lo, xsum[mt][0], y[j][mt][0]));
              y[j][mt][1] = fmaf(sv.x, acc[j][mt][1], fmaf(nzs_lo, xsum[mt][1], y[j][mt][1]));
              y[j][mt][2] = fmaf(sv.y, acc[j][mt][2], fmaf(nzs_hi, xsum[mt][2], y[j][mt][2]));
              y[j][mt][3] = fmaf(sv.y, acc[j][mt][3], fmaf(nzs_hi, xsum[mt][3], y[j][mt][3]));
            }
          }
        }
      }
    }
  }
  cuda::cp_async_wait<0>();

  // Accumulator r of tile (j, mt) is row n0 + g (+8 for r >= 2), activation row m0 + 2t (+1 for odd r).
  const int g = lane / 4, t = lane % 4;
  const bool split = p.splits > 1;
  float* part = split ? p.ws + size_t(blockIdx.y) * p.m * p.n : nullptr;
#pragma unroll
  for (int j = 0; j < TW; ++j)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = blockIdx.x * C::kBlockN + (warp * TW + j) * 16 + g + (r >> 1) * 8;
        const int m = mt * 8 + 2 * t + (r & 1);
        if (row >= p.n || m >= p.m) continue;
        const float v = y[j][mt][r] * ((r >> 1) ? D::kUnscaleHi : D::kUnscaleLo);
        if (split) {
          part[m * p.n + row] = v;
        } else {
          const float b = p.bias ? load_float(p.bias, row, p.bias_dtype) : 0.0f;
          static_cast<T*>(p.out)[m * p.n + row] = cuda::from_float<T>(v + b);
        }
      }
  if (!split) return;

  // Split-K: the last CTA of this column block to arrive sums the partials in split order.
  __threadfence();
  __syncthreads();
  if (tid == 0) last_cta = atomicAdd(p.tickets + blockIdx.x, 1) == p.splits - 1;
  __syncthreads();
  if (!last_cta) return;
  __threadfence();
  const int rows = min(C::kBlockN, p.n - int(blockIdx.x) * C::kBlockN);
  for (int e = tid; e < rows * p.m; e += kThreads) {
    const int m = e / rows, row = blockIdx.x * C::kBlockN + e % rows;
    float v = 0.0f;
    for (int sp = 0; sp < p.splits; ++sp) v += __ldcg(p.ws + (size_t(sp) * p.m + m) * p.n + row);
    if (p.bias) v += load_float(p.bias, row, p.bias_dtype);
    static_cast<T*>(p.out)[m * p.n + row] = cuda::from_float<T>(v);
  }
  if (tid == 0) p.tickets[blockIdx.x] = 0;  // ready for the next launch
}

template <typename T, typename TS, int MT, int FP>
void launch_mma(const MmaParams& p, cudaStream_t stream) {
  using C = Cfg<MT, FP>;
  auto* kernel = int4_mma_kernel<T, TS, MT, FP>;
  // Opting in to more dynamic shared memory is a per-device attribute;
  // setting it on every launch is cheap and stays right when the current
  // device changes. Always, not only above 48 KB: the kernel's static
  // __shared__ ticket counts against the default 48 KB too, and the MT=1,
  // group-32 build asks for exactly 48 KB of dynamic memory (its launches
  // failed with "invalid argument" on an H100 while this was conditional).
  PQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kTotal));
  kernel<<<dim3(cuda::ceil_div(p.n, C::kBlockN), p.splits), kThreads, C::kTotal, stream>>>(p);
  PQ_CUDA_CHECK(cudaGetLastError());
}

template <typename T, typename TS, int FP>
void launch_mt(const MmaParams& p, cudaStream_t stream) {
  if (p.m <= 8) return launch_mma<T, TS, 1, FP>(p, stream);
  if (p.m <= 16) return launch_mma<T, TS, 2, FP>(p, stream);
  if (p.m <= 32) return launch_mma<T, TS, 4, FP>(p, stream);
  // 64 rows with 32-column groups need more than 255 registers: not offered
  // (pyquant/ops/backends/cuda_mma.py declines it, dispatch falls back).
  if constexpr (FP == 2) throw std::invalid_argument("int4_mma_cuda: group 32 takes M <= 32");
  else return launch_mma<T, TS, 8, FP>(p, stream);
}

template <typename T, typename TS>
void launch_fp(const MmaParams& p, int64_t group, cudaStream_t stream) {
  // Groups shorter than a stage end inside it: 2 or 4 k16 steps per group.
  if (group == 32) return launch_mt<T, TS, 2>(p, stream);
  if (group == 64) return launch_mt<T, TS, 4>(p, stream);
  return launch_mt<T, TS, 8>(p, stream);
}

template <typename T>
void launch_scales(const MmaParams& p, int64_t group, int scale_dtype, cudaStream_t stream) {
  if (scale_dtype == kF16) return launch_fp<T, __half>(p, group, stream);
  return launch_fp<T, __nv_bfloat16>(p, group, stream);
}

}  // namespace

void int4_mma_cuda(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t bias, uintptr_t out,
                   uintptr_t ws, uintptr_t tickets, int64_t m, int64_t n, int64_t k, int64_t group, int64_t splits,
                   int scale_dtype, int bias_dtype, int x_dtype, uintptr_t stream) {
  if (m == 0 || n == 0) return;
  // The message is built only on failure: this runs on every call.
  auto fail = [&](const char* what) {
    throw std::invalid_argument("int4_mma_cuda (M=" + std::to_string(m) + ", N=" + std::to_string(n) + ", K=" +
                                std::to_string(k) + ", group " + std::to_string(group) + ", splits " +
                                std::to_string(splits) + "): " + what);
  };
  if (m < 0 || m > 64) fail("M must be in [0, 64]");
  if (k <= 0 || k % 8) fail("K must be a positive multiple of 8 (pad x)");
  if (x % 16 || qweight % 16 || scales % 16 || zeros % 16) fail("x, qweight, scales and zeros must be 16-byte aligned");
  if (scale_dtype != kF16 && scale_dtype != kBF16) fail("scales must be fp16 or bf16");
  if (x_dtype != kF16 && x_dtype != kBF16) fail("x must be fp16 or bf16");
  const int64_t np = cuda::ceil_div(n, 16) * 16, kp = cuda::ceil_div(k, kLayoutBlockK) * kLayoutBlockK;
  const int64_t ngroups = group == -1 ? 1 : cuda::ceil_div(k, group);
  if (np * kp / 2 >= (int64_t(1) << 31) || m * k >= (int64_t(1) << 31) || ngroups * np >= (int64_t(1) << 31))
    fail("tensors too large for 32-bit indexing");
  if (group != -1 && group != 32 && group != 64 && group != 128 && group != 256)
    fail("group size must be 32, 64, 128, 256 or -1");
  const int gshift = cuda::group_shift(group, k);
  const int64_t stages = cuda::ceil_div(k, kStageK);
  if (splits < 1 || splits > stages) fail("splits must be in [1, ceil(K / 128)]");
  const int64_t per_split = cuda::ceil_div(stages, splits);
  if (cuda::ceil_div(stages, per_split) != splits) fail("an empty split: use ceil(stages / ceil(stages / splits))");
  if (splits > 1 && (ws == 0 || tickets == 0)) fail("split-K needs a workspace and tickets");

  MmaParams p;
  p.x = reinterpret_cast<const void*>(x);
  p.qweight = reinterpret_cast<const uint4*>(qweight);
  p.scales = reinterpret_cast<const void*>(scales);
  p.zeros = reinterpret_cast<const void*>(zeros);
  p.bias = reinterpret_cast<const void*>(bias);
  p.out = reinterpret_cast<void*>(out);
  p.ws = reinterpret_cast<float*>(ws);
  p.tickets = reinterpret_cast<int*>(tickets);
  p.m = int(m);
  p.n = int(n);
  p.k = int(k);
  p.np = int(np);
  p.tiles16 = int(np / 16);
  p.blocks64 = int(kp / kLayoutBlockK);
  p.ngroups = int(ngroups);
  p.gshift = gshift;
  p.stages_total = int(stages);
  p.stages_per_split = int(per_split);
  p.splits = int(splits);
  p.bias_dtype = bias_dtype;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (x_dtype == kF16)
    launch_scales<__half>(p, group, scale_dtype, s);
  else
    launch_scales<__nv_bfloat16>(p, group, scale_dtype, s);
}

}  // namespace pyquant
