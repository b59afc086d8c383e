"""CUDA C++ kernels of the solver ops (pyquant._C built with PYQUANT_CUDA).

Experimental until a GPU run lists them in verified_kernels.json. Outputs are
allocated with torch on the input's device and the launch is enqueued on
torch's current stream, as for the matmul kernels (``cuda.py``).
"""
from __future__ import annotations


from .._dtypes import dtype_code, ptr
from ..dispatch import register_kernel
from ..reference.hqq import HQQSolution, solver_schedule
from .cuda import _src, cuda_ready, launch

GPTQ_MAX_BLOCK = 512  # widest block the CUDA kernel keeps in registers (csrc/cuda/launchers.h)


def _gptq_ok(fmt, device, m) -> bool:
    return m <= GPTQ_MAX_BLOCK and cuda_ready(device)


@register_kernel("gptq_block_update", "cuda", "int", _gptq_ok, sources=_src("gptq_block.cu"))
def gptq_block_update(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out):
    n, b = W.shape
    if n == 0 or stop <= start:
        return
    Hinv, scale, zero = Hinv.contiguous(), scale.contiguous(), zero.contiguous()
    launch(
        W.device, "gptq_block_update_cuda",
        ptr(W), W.stride(0), n, b, ptr(Hinv), Hinv.stride(0), ptr(scale), ptr(zero), scale.stride(0),
        start, stop, group_len, maxq, ptr(codes_out), codes_out.stride(0), ptr(err_out), err_out.stride(0),
    )


def _hqq_ok(fmt, device, m) -> bool:
    return cuda_ready(device)


@register_kernel("hqq_solve", "cuda", "int", _hqq_ok, sources=_src("hqq_solver.cu"))
def hqq_solve(w, bits, group, scale_dtype, iters, lp_norm, beta, kappa, early_stop):
    n, k = w.shape
    dev = w.device
    sol = HQQSolution.empty(n, k, group, dev)
    sched_cpu = solver_schedule(iters, lp_norm, beta, kappa)
    thr_last = float(sched_cpu[1, -1]) if iters else 0.0
    sched = sched_cpu.to(dev).contiguous()
    launch(
        dev, "hqq_solve_cuda",
        ptr(w), *(ptr(t) for t in (sol.codes, sol.scales, sol.zeros, sol.err, sol.iters)),
        n, k, group, bits, dtype_code(scale_dtype), iters, ptr(sched), float(lp_norm), thr_last, kappa == 1.0,
        bool(early_stop),
    )
    return sol.codes, sol.scales, sol.zeros, sol.err, sol.iters
