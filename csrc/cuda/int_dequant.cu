// Int format dequantization on the GPU (experimental until a GPU run passes it):
// out (N, K) = (q - z) * s, bit-exact with Int.decode (fp32 math, one rounding
// to the output dtype).
//
// Copy-bandwidth design: each thread owns one 32-code chunk of a row (16 bytes
// at 4 bits), loads it with one 128-bit streaming load (no byte is read twice),
// reads the chunk's one scale and zero (groups are multiples of 32), decodes
// the 32 codes in registers and writes them with 128-bit stores (4 at 16-bit
// output, 8 at fp32). The grid is (chunks of a row, rows): no division, and
// 32-bit index math except one 64-bit row base.
//
// Int4 decode, two outputs per instruction where exactness allows it: when the
// output and the scales share a 16-bit dtype and the zero point is an integer
// (GPTQ/AWQ/RTN, and every symmetric weight), q - z is formed exactly in
// half2/bfloat162 (magic-exponent codes 1024 + q / 128 + q, minus 1024 + z /
// 128 + z) and one packed multiply by s rounds the exact product once: the
// same value as fp32 (q - z) * s rounded to 16 bits. Otherwise (float zero
// points, mixed dtypes, fp32 output) each code takes the fp32 path of the spec.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda_check.h"
#include "cuda_common.cuh"
#include "launchers.h"
#include "ptx.cuh"
#include "pyquant/int_decode.h"
#include "pyquant/static_switch.h"

namespace pyquant {
namespace {

using cuda::from_float;

constexpr int kThreads = 128;
constexpr int kMaxGridRows = 65535;

template <typename T>
struct Raw16;  // the 16-bit storage type behind half / bfloat16
template <>
struct Raw16<__half> {
  using Pair = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024 + q (code in mantissa bits 0-3)
  static constexpr float kBase = 1024.0f;
};
template <>
struct Raw16<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128 + q
  static constexpr float kBase = 128.0f;
};

template <typename T>
__device__ __forceinline__ float scalar_to_float(T v) {
  return cuda::to_float<T>(v);
}

template <typename P>
__device__ __forceinline__ P as_pair(uint32_t v) {
  return *reinterpret_cast<P*>(&v);
}
template <typename P>
__device__ __forceinline__ uint32_t pair_bits(P v) {
  return *reinterpret_cast<uint32_t*>(&v);
}

// Codes (j, j+1) and (j+16, j+17) of a chunk from the bytes j, j+1 of word `w`
// (byte = c[j] | c[j+16] << 4), with `sel` picking those two bytes into the
// low byte of each half; -> (q - z) * s for both pairs, exact (see the top).
// zlo = base + z, nzhi = -(64 + z) (fp16) or zlo again (bf16), as pairs.
template <typename T>
__device__ __forceinline__ void int4_pairs_16(uint32_t w, uint32_t sel, typename Raw16<T>::Pair zlo,
                                              typename Raw16<T>::Pair nzhi, typename Raw16<T>::Pair spair,
                                              uint32_t& lo, uint32_t& hi) {
  using P = typename Raw16<T>::Pair;
  const uint32_t v = __byte_perm(w, 0, sel);
  const P qlo = as_pair<P>(cuda::and_or<0x000f000fu, Raw16<T>::kMagic>(v));
  lo = pair_bits(__hmul2(__hsub2(qlo, zlo), spair));
  if constexpr (std::is_same<T, __half>::value) {
    // The high nibble in mantissa bits 4-7 reads 1024 + 16 q: times 1/16
    // minus (64 + z) is q - z exactly, in one fma and without a shift.
    const P qhi = as_pair<P>(cuda::and_or<0x00f000f0u, Raw16<T>::kMagic>(v));
    hi = pair_bits(__hmul2(__hfma2(qhi, as_pair<P>(0x2c002c00u), nzhi), spair));  // 0x2c00 = 1/16
  } else {
    const P qhi = as_pair<P>(cuda::and_or<0x000f000fu, Raw16<T>::kMagic>(v >> 4));
    hi = pair_bits(__hmul2(__hsub2(qhi, zlo), spair));
  }
}

// 32 outputs of one chunk -> memory: 128-bit stores when the whole chunk is in
// the row and rows are 16-byte aligned, else element by element up to K.
template <typename Out>
__device__ __forceinline__ void store_chunk(Out* dst, const uint32_t (&bits)[32 * sizeof(Out) / 4], int valid,
                                           bool vec) {
  if (vec && valid == 32) {
#pragma unroll
    for (int i = 0; i < 32 * int(sizeof(Out)) / 16; ++i)
      reinterpret_cast<uint4*>(dst)[i] = make_uint4(bits[4 * i], bits[4 * i + 1], bits[4 * i + 2], bits[4 * i + 3]);
  } else {
    const Out* vals = reinterpret_cast<const Out*>(bits);
#pragma unroll
    for (int e = 0; e < 32; ++e)  // static register indices: no local-memory copy of the chunk
      if (e < valid) dst[e] = vals[e];
  }
}

struct DequantParams {
  const uint8_t* qweight;
  const void* scales;
  const void* zeros;  // nullptr: symmetric
  void* out;
  int n, k, row_bytes, chunks_per_row, ngroups, gshift, scale_dtype;
  bool vec;  // out rows 16-byte aligned
};

// fp32 path of the spec for the 32 codes of a chunk: (q - z) * s, rounded once.
template <typename Out>
__device__ __forceinline__ void decode_fp32(const uint8_t (&codes)[32], float s, float z,
                                            uint32_t (&bits)[32 * sizeof(Out) / 4]) {
  Out* vals = reinterpret_cast<Out*>(bits);
#pragma unroll
  for (int e = 0; e < 32; ++e) vals[e] = from_float<Out>((float(codes[e]) - z) * s);
}

// The 4 * BITS bytes of a chunk with the widest loads its alignment allows
// (16 / 8 / 4 bytes), streaming (evict-first: no byte is read twice).
template <int BITS>
__device__ __forceinline__ void load_chunk(const uint8_t* src, uint32_t (&w)[BITS]) {
  if constexpr (BITS == 4 || BITS == 8) {
#pragma unroll
    for (int i = 0; i < BITS / 4; ++i) {
      const uint4 v = __ldcs(reinterpret_cast<const uint4*>(src) + i);
      w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
    }
  } else if constexpr (BITS == 2) {
    const uint2 v = __ldcs(reinterpret_cast<const uint2*>(src));
    w[0] = v.x, w[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = __ldcs(reinterpret_cast<const unsigned int*>(src) + i);
  }
}

// One chunk of one row: load, decode, store. kFull: the whole chunk is inside
// K and rows are 16-byte aligned (128-bit stores); else element stores up to K.
template <typename Out, typename S, int BITS, bool kFull>
__device__ __forceinline__ void dequant_chunk(const DequantParams& p, int row, int chunk, int col, int g, int valid) {
  uint32_t words[BITS];
  load_chunk<BITS>(p.qweight + size_t(row) * p.row_bytes + chunk * (4 * BITS), words);
  const int gi = row * p.ngroups + g;
  const float s = cuda::to_float<S>(static_cast<const S*>(p.scales)[gi]);
  const float z = p.zeros ? cuda::to_float<S>(static_cast<const S*>(p.zeros)[gi]) : float(1 << (BITS - 1));
  Out* dst = static_cast<Out*>(p.out) + size_t(row) * p.k + col;
  uint32_t bits[32 * sizeof(Out) / 4];
  if constexpr (BITS == 4 && !std::is_same<Out, float>::value) {
    using P = typename Raw16<Out>::Pair;
    // Fast path: scales in the output dtype and an integral zero point.
#ifndef PYQUANT_DEQUANT_FAST_PATH_ONLY  // defined only by the offline SASS count of this path
    if (std::is_same<S, Out>::value && z == truncf(z) && fabsf(z) <= 64.0f)
#endif
    {
      const uint16_t sraw = static_cast<const uint16_t*>(p.scales)[gi];  // S is Out here
      const P spair = as_pair<P>(uint32_t(sraw) * 0x00010001u);
      // base + z and -(64 + z): integers below 2^10, exact in both 16-bit types
      const P zlo = cuda::float2_to_pair<P>(Raw16<Out>::kBase + z);
      const P nzhi = std::is_same<Out, __half>::value ? cuda::float2_to_pair<P>(-(64.0f + z)) : zlo;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // outputs 4i..4i+3 (low nibbles) and 16+4i..16+4i+3 (high nibbles)
        int4_pairs_16<Out>(words[i], 0x4140, zlo, nzhi, spair, bits[2 * i], bits[8 + 2 * i]);
        int4_pairs_16<Out>(words[i], 0x4342, zlo, nzhi, spair, bits[2 * i + 1], bits[8 + 2 * i + 1]);
      }
      store_chunk<Out>(dst, bits, kFull ? 32 : valid, kFull);
      return;
    }
  }
  uint8_t codes[32];
  int_decode_chunk(reinterpret_cast<const uint8_t*>(words), BITS, codes);
  decode_fp32<Out>(codes, s, z, bits);
  store_chunk<Out>(dst, bits, kFull ? 32 : valid, kFull);
}

template <typename Out, typename S, int BITS>
__device__ __forceinline__ void dequant_rows(const DequantParams& p, int chunk, int col, int g, int valid) {
  if (valid == kIntChunk && p.vec) {
    for (int row = blockIdx.y; row < p.n; row += gridDim.y)
      dequant_chunk<Out, S, BITS, true>(p, row, chunk, col, g, valid);
  } else {
    for (int row = blockIdx.y; row < p.n; row += gridDim.y)
      dequant_chunk<Out, S, BITS, false>(p, row, chunk, col, g, valid);
  }
}

template <typename Out, int BITS>
__global__ void __launch_bounds__(kThreads) int_dequant_kernel(const DequantParams p) {
  const int chunk = blockIdx.x * kThreads + threadIdx.x;
  if (chunk >= p.chunks_per_row) return;
  const int col = chunk * kIntChunk;
  const int valid = min(kIntChunk, p.k - col);
  const int g = col >> p.gshift;
  // One loop per scale dtype: no dtype switch per chunk.
  if (p.scale_dtype == kF16)
    dequant_rows<Out, __half, BITS>(p, chunk, col, g, valid);
  else if (p.scale_dtype == kBF16)
    dequant_rows<Out, __nv_bfloat16, BITS>(p, chunk, col, g, valid);
  else
    dequant_rows<Out, float, BITS>(p, chunk, col, g, valid);
}

}  // namespace

void int_dequant_cuda(uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t out, int64_t n, int64_t k,
                      int bits, int64_t group, int scale_dtype, int out_dtype, uintptr_t stream) {
  if (n == 0 || k == 0) return;
  if (n * k >= (int64_t(1) << 31) || n > (int64_t(1) << 30))
    throw std::invalid_argument("int_dequant_cuda: N*K must stay below 2^31 (32-bit index math)");
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
    throw std::invalid_argument("int_dequant_cuda: bits must be 2, 3, 4 or 8, got " + std::to_string(bits));
  if (qweight % 16) throw std::invalid_argument("int_dequant_cuda: qweight must be 16-byte aligned");
  DequantParams p;
  p.qweight = reinterpret_cast<const uint8_t*>(qweight);
  p.scales = reinterpret_cast<const void*>(scales);
  p.zeros = reinterpret_cast<const void*>(zeros);
  p.out = reinterpret_cast<void*>(out);
  p.n = int(n);
  p.k = int(k);
  p.row_bytes = int_row_bytes(k, bits);
  p.chunks_per_row = int(cuda::ceil_div(k, kIntChunk));
  p.ngroups = int(cuda::ceil_div(k, group));
  p.gshift = cuda::group_shift(group, k);
  if (p.gshift < 0)
    throw std::invalid_argument("int_dequant_cuda: group size must be a power of two >= 32, got " +
                                std::to_string(group));
  p.scale_dtype = scale_dtype;
  const dim3 grid(unsigned(cuda::ceil_div(p.chunks_per_row, kThreads)), unsigned(std::min<int64_t>(n, kMaxGridRows)));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  PQ_DTYPE_SWITCH(out_dtype, scalar_t, "int_dequant_cuda", [&] {
    p.vec = out % 16 == 0 && (k * int64_t(sizeof(scalar_t))) % 16 == 0;
    switch (bits) {
      case 2: int_dequant_kernel<scalar_t, 2><<<grid, kThreads, 0, s>>>(p); break;
      case 3: int_dequant_kernel<scalar_t, 3><<<grid, kThreads, 0, s>>>(p); break;
      case 4: int_dequant_kernel<scalar_t, 4><<<grid, kThreads, 0, s>>>(p); break;
      default: int_dequant_kernel<scalar_t, 8><<<grid, kThreads, 0, s>>>(p); break;
    }
    PQ_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace pyquant
