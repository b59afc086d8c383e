"""CPU C++ kernels of the solver ops: thin wrappers over pyquant._C.

The C++ loops index by the sizes they are given: the op checked them at its
boundary (``pyquant.ops.solvers``); what is left here is the contiguity each
kernel assumes and the pointer plumbing. Each kernel is offered only when the
extension has its entry point (an older build leaves the op to the reference).
"""
from __future__ import annotations

import torch

from ... import _ext
from ...errors import ShapeError
from .._dtypes import dtype_code, ptr
from ..dispatch import register_kernel
from ..reference.hqq import HQQSolution, solver_schedule


def _has(entry: str):
    def supports(fmt, device, m) -> bool:
        if device.type != "cpu":
            return False
        ext = _ext.load()
        return ext is not None and hasattr(ext, entry)

    return supports


@register_kernel("gptq_block_update", "cpu", "int", _has("gptq_block_update_f32"))
def gptq_block_update(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out):
    for name, t in (("W", W), ("Hinv", Hinv), ("scale", scale), ("zero", zero)):
        if not t.is_contiguous():
            raise ShapeError(f"gptq_block_update: the CPU kernel needs {name} contiguous")
    n, b = W.shape
    _ext.load().gptq_block_update_f32(
        ptr(W), b, n, b, ptr(Hinv), Hinv.shape[1], ptr(scale), ptr(zero), scale.shape[1],
        start, stop, group_len, maxq, ptr(codes_out), codes_out.stride(0), ptr(err_out), err_out.stride(0),
        torch.get_num_threads(),
    )


def _solver_args(w, bits, group, scale_dtype, iters, lp_norm, beta, kappa, early_stop):
    """(outputs, positional C++ arguments up to the early-stop flag, schedule kept alive)."""
    n, k = w.shape
    sol = HQQSolution.empty(n, k, group)
    sched = solver_schedule(iters, lp_norm, beta, kappa).contiguous()
    outs = tuple(t.data_ptr() for t in (sol.codes, sol.scales, sol.zeros, sol.err, sol.iters))
    args = (w.data_ptr(), *outs, n, k, group, bits, dtype_code(scale_dtype), iters, sched.data_ptr(),
            float(lp_norm), kappa == 1.0, bool(early_stop))
    return sol, args, sched


@register_kernel("hqq_solve", "cpu", "int", _has("hqq_solve_cpu"))
def hqq_solve(w, bits, group, scale_dtype, iters, lp_norm, beta, kappa, early_stop):
    sol, args, sched = _solver_args(w, bits, group, scale_dtype, iters, lp_norm, beta, kappa, early_stop)
    _ext.load().hqq_solve_cpu(*args, torch.get_num_threads())
    del sched
    return sol.codes, sol.scales, sol.zeros, sol.err, sol.iters


@register_kernel("hqq_solve_integer_zero", "cpu", "int", _has("hqq_solve_integer_zero_cpu"))
def hqq_solve_integer_zero(w, bits, group, scale_dtype, zero_slack, iters, lp_norm, beta, kappa, early_stop):
    sol, args, sched = _solver_args(w, bits, group, scale_dtype, iters, lp_norm, beta, kappa, early_stop)
    _ext.load().hqq_solve_integer_zero_cpu(*args, float(zero_slack), torch.get_num_threads())
    del sched
    return sol.codes, sol.scales, sol.zeros, sol.err, sol.iters


@register_kernel("kquant_quantize", "cpu", "gguf", _has("kquant_quantize"))
def kquant_quantize(x, fmt, imatrix):
    n, k = x.shape
    bt = fmt.block
    blocks = torch.empty((n, k // bt.block_size * bt.type_size), dtype=torch.uint8)
    _ext.load().kquant_quantize(bt.ggml_type, x.data_ptr(), 0 if imatrix is None else imatrix.data_ptr(), n, k,
                                blocks.data_ptr(), torch.get_num_threads())
    return blocks
