// Host entry points of every CUDA kernel in this folder, all bound in
// cuda_bindings.cpp. Pointers arrive as integers, already validated in
// Python (pyquant/ops/cuda_kernels.py); dtype codes are pyquant::DType.
// Every launcher enqueues on `stream` (torch's current stream), never
// synchronizes, allocates nothing, and throws on a launch error or an
// unknown code.
#pragma once
#include <cstdint>

namespace pyquant {

// y (M, N) in x's dtype = x (M, K) @ W_hat^T + bias, W_hat from an Int(4, group)
// weight (qweight (N, ceil(K/32)*16) uint8, scales/zeros (N, ceil(K/group))).
// M in [1, 8]; zeros == 0 means symmetric (zero point 8); bias == 0: none.
void int4_gemv_cuda(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t bias, uintptr_t out,
                    int64_t m, int64_t n, int64_t k, int64_t group, int scale_dtype, int bias_dtype, int x_dtype,
                    uintptr_t stream);

// y (M, N) in x's dtype = x (M, K) @ W_hat^T + bias on tensor cores, W_hat from
// an IntMMA weight (pyquant/formats/int_mma.py: qweight (ceil(N/16), ceil(K/64)*512)
// uint8, scales/zeros (ceil(K/group), ceil(N/16)*16) fp16 or bf16). x fp16/bf16,
// M <= 64 (M <= 32 for group 32), K % 8 == 0, x/qweight/scales/zeros 16-byte
// aligned. K is cut into `splits` ranges of whole 128-column stages (a valid
// count: ceil(S / ceil(S / splits)) == splits for S = ceil(K / 128)); with
// splits > 1, ws is fp32 (splits, M, N) scratch and tickets int32
// (ceil(N / 64),), all zero before the first launch and left zero by every
// launch (the last CTA of a column block resets its ticket).
void int4_mma_cuda(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t bias, uintptr_t out,
                   uintptr_t ws, uintptr_t tickets, int64_t m, int64_t n, int64_t k, int64_t group, int64_t splits,
                   int scale_dtype, int bias_dtype, int x_dtype, uintptr_t stream);

// IntMMA weight -> out (N, K) in out_dtype, bit-exact with IntMMA.decode; perm
// (int32 (K,), or 0) scatters stored column j to output column perm[j].
void int4_mma_dequant_cuda(uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t perm, uintptr_t out,
                           int64_t n, int64_t k, int64_t group, int scale_dtype, int out_dtype, uintptr_t stream);

// Per-row symmetric int8 quantization of x (M, K): scale[m] = max|x[m]| / 127,
// q[m, j] = clamp(rint(x[m, j] / scale[m]), -127, 127) (0 where the scale is 0),
// q (M, kp) int8 with columns K..kp-1 set to 0.
void quantize_rows_int8_cuda(uintptr_t x, uintptr_t q, uintptr_t scale, int64_t m, int64_t k, int64_t kp,
                             int x_dtype, uintptr_t stream);

// out (M, N) = ((float(qa @ (w - 128)^T) * sa[m]) * sw[n]) + bias[n], in out_dtype.
// qa (M, kp) int8, w (N, kp) uint8 codes of an Int(8, per-channel, symmetric)
// weight, sa fp32 (M,), sw (N,) in scale_dtype; kp a multiple of 32.
void w8a8_gemm_cuda(uintptr_t qa, uintptr_t sa, uintptr_t w, uintptr_t sw, uintptr_t bias, uintptr_t out, int64_t m,
                    int64_t n, int64_t kp, int scale_dtype, int bias_dtype, int out_dtype, uintptr_t stream);

// NF4 (bitsandbytes layout) -> out (numel values) in out_dtype. Plain absmax
// (fp32, one per block) or double quantization (absmax == 0: absmax_q uint8,
// absmax_scale fp32 per 256 blocks, absmax_offset fp32 (1,), dyn_map fp32 (256,)
// on the device).
void nf4_dequant_cuda(uintptr_t qweight, uintptr_t absmax, uintptr_t absmax_q, uintptr_t absmax_scale,
                      uintptr_t absmax_offset, uintptr_t dyn_map, uintptr_t out, int64_t numel, int64_t block_size,
                      int out_dtype, uintptr_t stream);

// Int format (pyquant/formats/int_format.py) -> out (N, K) in out_dtype:
// (q - z) * s, qweight (N, row bytes) uint8, scales/zeros (N, ceil(K/group))
// in scale_dtype; zeros == 0 means symmetric (zero point 2^(bits-1)).
void int_dequant_cuda(uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t out, int64_t n, int64_t k,
                      int bits, int64_t group, int scale_dtype, int out_dtype, uintptr_t stream);

// nblocks raw GGUF blocks of ggml type `type` -> out (nblocks * block size values)
// in out_dtype.
void gguf_dequant_cuda(uintptr_t blocks, uintptr_t out, int64_t nblocks, int type, int out_dtype, uintptr_t stream);

// GPTQ's in-block column update (spec: pyquant/algorithms/gptq.py::gptq_block_update_reference),
// fp32: w (n, b) row stride ldw, updated in place; hinv (>= stop, b) row stride ldh; scale/zero
// (n, groups) row stride ldsz; codes uint8 / err fp32 (n, stop - start) row strides ldc / lde.
// b <= kGptqCudaMaxBlock; throws std::invalid_argument on bad sizes.
constexpr int64_t kGptqCudaMaxBlock = 512;
void gptq_block_update_cuda(uintptr_t w, int64_t ldw, int64_t n, int64_t b, uintptr_t hinv, int64_t ldh,
                            uintptr_t scale, uintptr_t zero, int64_t ldsz, int64_t start, int64_t stop,
                            int64_t group_len, int64_t maxq, uintptr_t codes, int64_t ldc, uintptr_t err,
                            int64_t lde, uintptr_t stream);

// HQQ solver (spec: pyquant/algorithms/hqq_reference.py), fp32 w (n, k) in
// groups of `group` along k: codes uint8 (n, k), scales/zeros/err fp32 and
// steps int32 (n, ceil(k/group)); schedule fp32 (2, iters) on the device.
// Same contract as the CPU solver hqq_solve_cpu.
void hqq_solve_cuda(uintptr_t w, uintptr_t codes, uintptr_t scales, uintptr_t zeros, uintptr_t err, uintptr_t steps,
                    int64_t n, int64_t k, int64_t group, int bits, int scale_dtype, int iters, uintptr_t schedule,
                    double lp_norm, double thr_last, bool kappa_one, bool early_stop, uintptr_t stream);

}  // namespace pyquant
