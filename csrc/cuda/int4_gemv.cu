// INT4 weight-only GEMV for M <= 8 activation rows: y = x @ W_hat^T + bias,
// with W_hat = (q - z) * s per group (pyquant/formats/int_format.py), fp32
// accumulation, output in x's dtype. Experimental until a GPU run passes it.
//
// Why this shape (decode is memory-bound: every weight byte is read once)
// -----------------------------------------------------------------------
// * Weight stream. A packed row is a sequence of 32-code chunks of 16 bytes,
//   so lane l of a warp reads chunk l of a row with one 128-bit load: the 32
//   lanes together read 512 contiguous bytes of that row (4 full 128-byte
//   lines, perfectly coalesced). Each warp owns kRows rows and issues their
//   loads back to back, and the loads for tile t+1 are issued before tile t is
//   computed (a register double buffer), so every lane keeps 2 * kRows * 16
//   bytes in flight: with 4 warps per block and several blocks per SM that is
//   tens of KB per SM, what Little's law asks of HBM3 (~3-5 TB/s at ~1 us).
//   The loads use the streaming hint (__ldcs: evict-first) because no weight
//   byte is read twice, which leaves L2 to x and the scales.
// * Dequantization in registers. Byte j of a chunk holds code j (low nibble)
//   and code j+16 (high nibble), so a 32-bit word holds codes 4w..4w+3 and
//   16+4w..16+4w+3: a shift and a mask give a code, and OR-ing it into the
//   mantissa of 2^23 and subtracting 2^23 turns it into an exact float without
//   the slow integer-to-float unit. w = q*s + (-z*s) is one FMA per code.
// * x reuse. Each x value is needed by every row, so the block stages a tile
//   of x (M rows x 1024 columns) in shared memory once and all 16 rows of the
//   block read it from there. A tile is stored chunk by chunk with 16 bytes of
//   padding after each 32-value chunk: lane l reads chunk l with 128-bit loads,
//   and the padded stride (80 bytes for 16-bit x) puts the 8 lanes of each
//   quarter-warp on distinct banks. Staging also zero-fills past K (the ragged
//   tail: padding codes then multiply zeros) and handles any K alignment, since
//   x rows start at arbitrary 2-byte offsets when K is odd.
// * Register blocking. Per 8-code quarter of a chunk the lane decodes the
//   codes of all kRows rows first, then streams x one activation row at a
//   time: each x value loaded from shared memory feeds kRows FMAs.
// * Reduction. Each lane holds partial sums for (row, m) pairs; a butterfly of
//   warp shuffles reduces them and lane r*M + m writes output (m, row).
//   No shared memory, no atomics, no workspace: CUDA-graph safe.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda_check.h"
#include "cuda_common.cuh"
#include "launchers.h"
#include "pyquant/static_switch.h"

namespace pyquant {
namespace {

using cuda::from_float;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 4;                     // rows per warp
constexpr int kRowsPerBlock = kWarps * kRows;  // 16
constexpr int kTileChunks = 32;              // one chunk per lane per tile
constexpr int kTileK = kTileChunks * 32;     // 1024 codes

// Shared-memory stride of one 32-value chunk of x, in elements: 32 values plus
// 16 bytes of padding (see the bank argument above).
template <typename T>
struct ChunkStride {
  static constexpr int value = 32 + 16 / int(sizeof(T));
};

struct GemvParams {
  const void* x;
  const uint8_t* qweight;
  const void* scales;
  const void* zeros;  // nullptr: symmetric, implicit zero point 8
  const void* bias;   // nullptr: no bias
  void* out;
  int64_t n;
  int64_t k;
  int64_t row_bytes;  // Kp / 2
  int64_t ngroups;
  int gshift;  // group index of code c = c >> gshift (31 for one group per row)
  int scale_dtype;
  int bias_dtype;
  bool x_vec16;  // x rows are 16-byte aligned (base aligned and K * sizeof(T) % 16 == 0)
};

// 4-bit code (already masked) -> exact float.
__device__ __forceinline__ float code_to_float(uint32_t q) { return __uint_as_float(0x4B000000u | q) - 8388608.0f; }

// Issues the loads of chunk `chunk` of the warp's rows (zeros where out of range).
__device__ __forceinline__ void load_chunk(const GemvParams& p, int64_t row0, int64_t chunk, int64_t nchunks,
                                           uint4 (&w)[kRows], float (&s)[kRows], float (&nzs)[kRows]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = row0 + r;
    if (row < p.n && chunk < nchunks) {
      w[r] = __ldcs(reinterpret_cast<const uint4*>(p.qweight + row * p.row_bytes) + chunk);
      const int64_t gi = row * p.ngroups + ((chunk * 32) >> p.gshift);
      const float sv = load_float(p.scales, gi, p.scale_dtype);
      const float z = p.zeros ? load_float(p.zeros, gi, p.scale_dtype) : 8.0f;
      s[r] = sv;
      nzs[r] = -z * sv;
    } else {
      w[r] = make_uint4(0, 0, 0, 0);
      s[r] = 0.0f;
      nzs[r] = 0.0f;
    }
  }
}

// Copies x[:, k0:k0+kTileK] into the padded shared tile, zero past K. Raw
// bit copies: no conversion, and +0.0 is the all-zero pattern in every dtype.
template <int M, typename T>
__device__ __forceinline__ void stage_x(const GemvParams& p, T* xs, int64_t k0) {
  constexpr int S = ChunkStride<T>::value;
  const T* x = static_cast<const T*>(p.x);
  if (p.x_vec16) {
    constexpr int V = 16 / sizeof(T);
    constexpr int kVecPerRow = kTileK / V;
    for (int v = threadIdx.x; v < M * kVecPerRow; v += kThreads) {
      const int m = v / kVecPerRow;
      const int kk = (v % kVecPerRow) * V;
      uint4 val = make_uint4(0, 0, 0, 0);
      // K is a multiple of V here, so a vector is either wholly inside or wholly past K.
      if (k0 + kk < p.k) val = *reinterpret_cast<const uint4*>(x + m * p.k + k0 + kk);
      *reinterpret_cast<uint4*>(xs + (m * kTileChunks + kk / 32) * S + kk % 32) = val;
    }
  } else {
    using Raw = typename std::conditional<sizeof(T) == 2, uint16_t, uint32_t>::type;
    const Raw* xr = reinterpret_cast<const Raw*>(x);
    Raw* xsr = reinterpret_cast<Raw*>(xs);
    for (int i = threadIdx.x; i < M * kTileK; i += kThreads) {
      const int m = i / kTileK;
      const int kk = i % kTileK;
      xsr[(m * kTileChunks + kk / 32) * S + kk % 32] = (k0 + kk < p.k) ? xr[m * p.k + k0 + kk] : Raw(0);
    }
  }
}

template <int M, typename T>
__global__ void __launch_bounds__(kThreads) int4_gemv_kernel(const GemvParams p) {
  constexpr int S = ChunkStride<T>::value;
  __shared__ __align__(16) T xs[M * kTileChunks * S];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = int64_t(blockIdx.x) * kRowsPerBlock + warp * kRows;
  const int64_t nchunks = p.row_bytes / 16;
  const int64_t ntiles = (nchunks + kTileChunks - 1) / kTileChunks;

  float acc[kRows][M];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;

  uint4 w_next[kRows];
  float s_next[kRows], nzs_next[kRows];
  load_chunk(p, row0, lane, nchunks, w_next, s_next, nzs_next);

  for (int64_t t = 0; t < ntiles; ++t) {
    uint4 w[kRows];
    float s[kRows], nzs[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      w[r] = w_next[r];
      s[r] = s_next[r];
      nzs[r] = nzs_next[r];
    }
    const int64_t chunk = t * kTileChunks + lane;
    // Next tile's weights are in flight while this tile is staged and computed.
    if (t + 1 < ntiles) load_chunk(p, row0, chunk + kTileChunks, nchunks, w_next, s_next, nzs_next);

    __syncthreads();  // every warp is done reading the previous tile of x
    stage_x<M, T>(p, xs, t * kTileK);
    __syncthreads();

    if (chunk < nchunks) {
      const T* xl = xs + lane * S;  // this lane's chunk, activation row 0
#pragma unroll
      for (int qq = 0; qq < 4; ++qq) {
        // Codes 8qq..8qq+7: low nibbles of words (0,1) / (2,3) for qq = 0 / 1,
        // high nibbles of the same words for qq = 2 / 3.
        const int sh = (qq >> 1) * 4;
        float wf[kRows][8];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const uint32_t wa = (qq & 1) ? w[r].z : w[r].x;
          const uint32_t wb = (qq & 1) ? w[r].w : w[r].y;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            wf[r][e] = fmaf(code_to_float((wa >> (8 * e + sh)) & 0xFu), s[r], nzs[r]);
            wf[r][4 + e] = fmaf(code_to_float((wb >> (8 * e + sh)) & 0xFu), s[r], nzs[r]);
          }
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float xv[8];
          cuda::load8_as_float(xl + m * kTileChunks * S + 8 * qq, xv);
#pragma unroll
          for (int r = 0; r < kRows; ++r)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[r][m] = fmaf(wf[r][e], xv[e], acc[r][m]);
        }
      }
    }
  }

  // Butterfly reduction: afterwards every lane holds every sum; lane r*M + m keeps (r, m).
  float mine = 0.0f;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float v = cuda::warp_sum(acc[r][m]);
      if (lane == r * M + m) mine = v;
    }
  if (lane < kRows * M) {
    const int r = lane / M, m = lane % M;
    const int64_t row = row0 + r;
    if (row < p.n) {
      if (p.bias) mine += load_float(p.bias, row, p.bias_dtype);
      static_cast<T*>(p.out)[m * p.n + row] = from_float<T>(mine);
    }
  }
}

template <typename T>
void launch_gemv(const GemvParams& p, int m, cudaStream_t stream) {
  const int64_t blocks = cuda::ceil_div(p.n, kRowsPerBlock);
  switch (m) {
#define PQ_GEMV_CASE(MM) \
  case MM:               \
    int4_gemv_kernel<MM, T><<<blocks, kThreads, 0, stream>>>(p); \
    break;
    PQ_GEMV_CASE(1)
    PQ_GEMV_CASE(2)
    PQ_GEMV_CASE(3)
    PQ_GEMV_CASE(4)
    PQ_GEMV_CASE(5)
    PQ_GEMV_CASE(6)
    PQ_GEMV_CASE(7)
    PQ_GEMV_CASE(8)
#undef PQ_GEMV_CASE
    default:
      throw std::invalid_argument("int4_gemv_cuda: M must be in [1, 8], got " + std::to_string(m));
  }
  PQ_CUDA_CHECK(cudaGetLastError());
}

int log2_exact(int64_t v) {
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

}  // namespace

void int4_gemv_cuda(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t bias, uintptr_t out,
                    int64_t m, int64_t n, int64_t k, int64_t group, int scale_dtype, int bias_dtype, int x_dtype,
                    uintptr_t stream) {
  if (m == 0 || n == 0) return;
  if (k <= 0) throw std::invalid_argument("int4_gemv_cuda: K must be positive");
  if (qweight % 16) throw std::invalid_argument("int4_gemv_cuda: qweight must be 16-byte aligned");
  GemvParams p;
  p.x = reinterpret_cast<const void*>(x);
  p.qweight = reinterpret_cast<const uint8_t*>(qweight);
  p.scales = reinterpret_cast<const void*>(scales);
  p.zeros = reinterpret_cast<const void*>(zeros);
  p.bias = reinterpret_cast<const void*>(bias);
  p.out = reinterpret_cast<void*>(out);
  p.n = n;
  p.k = k;
  p.row_bytes = ((k + 31) / 32) * 16;
  p.ngroups = cuda::ceil_div(k, group);
  if (p.ngroups == 1) {
    p.gshift = 31;  // chunk * 32 < 2^31, so every chunk maps to group 0
  } else {
    if (group < 32 || (group & (group - 1)))
      throw std::invalid_argument("int4_gemv_cuda: group size must be a power of two >= 32, got " +
                                  std::to_string(group));
    p.gshift = log2_exact(group);
  }
  p.scale_dtype = scale_dtype;
  p.bias_dtype = bias_dtype;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  PQ_DTYPE_SWITCH(x_dtype, scalar_t, "int4_gemv_cuda", [&] {
    p.x_vec16 = (x % 16 == 0) && ((k * int64_t(sizeof(scalar_t))) % 16 == 0);
    launch_gemv<scalar_t>(p, int(m), s);
  });
}

}  // namespace pyquant
