// Host entry points of the Hopper (sm_90a) kernels built on CUTLASS
// (*_sm90.cu, built only where the CUTLASS headers are) and of the W8A8
// activation quantizer that feeds one of them (quantize_rows_w8a8.cu, every
// architecture). Bound in cuda_bindings.cpp like launchers.h's, same
// conventions: pointers as integers validated in Python
// (pyquant/ops/backends/cuda_w8a8.py, cuda_int4mma_sm90.py), dtype codes of
// pyquant::DType, work enqueued on `stream`, errors thrown.
//
// A header of its own rather than launchers.h: launchers.h is part of the
// source hash of every kernel that includes it (pyquant/ops/kernel_sources.py),
// so a new declaration there would send every verified kernel back to
// experimental.
#pragma once
#include <cstdint>

namespace pyquant {

// Per-row symmetric int8 quantization of x (M, K) in x_dtype, the spec of
// pyquant.ops.reference.quantize_rows_int8 bit for bit: scale[m] = max|x[m]| / 127,
// q[m, j] = clamp(rint(x[m, j] / scale[m]), -127, 127) (0 where the scale is 0),
// q (M, kp) int8 with columns K..kp-1 set to 0 (kp a multiple of 16), and
// corr[m] = 128 * sum_j q[m, j] in int32 (the zero-point correction of the
// s8 x u8 GEMM). x rows with 16-byte aligned starts are read 16 bytes at a time.
void quantize_rows_w8a8_cuda(uintptr_t x, uintptr_t q, uintptr_t scale, uintptr_t corr, int64_t m, int64_t k,
                             int64_t kp, int x_dtype, uintptr_t stream);

struct W8A8Sm90Args {
  uintptr_t qa, sa, corr;  // int8 (M, kp), fp32 (M,), int32 (M,): quantize_rows_w8a8_cuda's outputs
  uintptr_t w, sw, bias;   // uint8 codes (N, kp) with zero point 128, fp32 (N,), fp32 (N,) or 0
  uintptr_t out;           // (M, N) in out_dtype
  int64_t m, n, kp;
  int out_dtype;  // kF16 or kBF16
};

// out = ((float(qa @ w^T - corr[m]) * sa[m]) * sw[n]) + bias[n] on Hopper
// tensor cores. N % 8 == 0, kp % 16 == 0, every pointer 16-byte aligned;
// `workspace` of w8a8_sm90_workspace_bytes(m, n, kp, out_dtype) bytes.
void w8a8_sm90_gemm_cuda(uintptr_t qa, uintptr_t sa, uintptr_t corr, uintptr_t w, uintptr_t sw, uintptr_t bias,
                         uintptr_t out, uintptr_t workspace, int64_t workspace_bytes, int64_t m, int64_t n,
                         int64_t kp, int out_dtype, uintptr_t stream);
int64_t w8a8_sm90_workspace_bytes(int64_t m, int64_t n, int64_t kp, int out_dtype);

struct Int4MmaSm90Args {
  uintptr_t x;        // (M, K) in dtype, K-major
  uintptr_t qweight;  // IntMMA codes (Np/16, Kp*8) uint8
  uintptr_t scales;   // (G, Np) in dtype, natural row order (IntMMA's, unpermuted)
  uintptr_t zeros;    // (G, Np) in dtype: z' = -scale * zero point
  uintptr_t bias;     // fp32 (N,) or 0
  uintptr_t out;      // (M, N) in dtype
  int64_t m, n, k, np, kp, group;  // group: a multiple of 64, or K (one group per row)
  int dtype;                       // kF16 or kBF16: x, scales, zeros and out
};

// out = x @ W_hat^T + bias for an IntMMA weight, W_hat = scale * q + z' per
// group, on Hopper tensor cores (M > 64 is what it is for). N and K multiples
// of 8, every pointer 16-byte aligned; `workspace` of
// int4mma_sm90_workspace_bytes(...) bytes.
void int4mma_sm90_gemm_cuda(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t bias,
                            uintptr_t out, uintptr_t workspace, int64_t workspace_bytes, int64_t m, int64_t n,
                            int64_t k, int64_t group, int dtype, uintptr_t stream);
int64_t int4mma_sm90_workspace_bytes(int64_t m, int64_t n, int64_t k, int64_t group, int dtype);

}  // namespace pyquant
