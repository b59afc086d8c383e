"""Entry points of the solver ops: the hot loops of the quantization algorithms.

``pyquant.algorithms`` calls these; each validates at the boundary and calls
its ``torch.ops.pyquant`` op, whose kernel the one registry chooses
(``kernel="auto"|"cpu"|"cuda"|"triton"|"reference"``, as for every op):

* :func:`gptq_block_update`: GPTQ's sequential column update inside a block;
* :func:`hqq_solve` / :func:`hqq_solve_integer_zero`: HQQ's half-quadratic
  solver with float zero points (the ``hqq`` package's formulation) or with
  zero points held within ``zero_slack`` steps of an integer;
* :func:`kquant_quantize`: llama.cpp's k-quant quantizers into block bytes.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import FormatError, ShapeError
from ..formats.gguf import GGUF
from ..validation import check_float
from . import library  # noqa: F401  (defines the ops)
from .reference.gptq import check_block_update_args
from .reference.hqq import HQQSolution


def check_kernel_arg(kernel) -> None:
    if not isinstance(kernel, str):
        raise FormatError(f"kernel must be a string, got {type(kernel).__name__}")


def gptq_block_update(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out,
                      kernel: str = "auto") -> None:
    """GPTQ's in-block update, in place; the contract is
    :func:`pyquant.ops.reference.gptq.gptq_block_update_reference`'s. Inputs are
    fp32 (``codes_out`` uint8), 2-D, on one device, with a unit column stride."""
    check_kernel_arg(kernel)
    check_block_update_args(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out)
    torch.ops.pyquant.gptq_block_update(W, Hinv, scale, zero, int(start), int(stop), int(group_len), int(maxq),
                                        codes_out, err_out, kernel)


def _check_solver_input(w: torch.Tensor, group: int) -> torch.Tensor:
    check_float("weight", w, (torch.float32,))
    if w.dim() != 2 or group < 1:
        raise ShapeError(f"HQQ solver: weight must be 2-D fp32 and group >= 1, got {tuple(w.shape)}, "
                         f"group={group}")
    return w.contiguous()


def hqq_solve(w: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype, *, iters: int, lp_norm: float,
              beta: float, kappa: float, early_stop: bool, kernel: str = "auto") -> HQQSolution:
    """HQQ with float zero points on fp32 ``w`` (N, K) cut into groups of
    ``group`` columns; parameters as validated by ``pyquant.algorithms.hqq``."""
    check_kernel_arg(kernel)
    w = _check_solver_input(w, group)
    out = torch.ops.pyquant.hqq_solve(w, int(bits), int(group), scale_dtype, int(iters), float(lp_norm),
                                      float(beta), float(kappa), bool(early_stop), kernel)
    return HQQSolution(*out)


def hqq_solve_integer_zero(w: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype, *, zero_slack: float,
                           iters: int, lp_norm: float, beta: float, kappa: float, early_stop: bool,
                           kernel: str = "auto") -> HQQSolution:
    """HQQ with each zero point within ``zero_slack`` steps of RTN's integer
    (0: integer zeros); see :mod:`pyquant.ops.reference.hqq_integer_zero`."""
    check_kernel_arg(kernel)
    w = _check_solver_input(w, group)
    out = torch.ops.pyquant.hqq_solve_integer_zero(w, int(bits), int(group), scale_dtype, float(zero_slack),
                                                   int(iters), float(lp_norm), float(beta), float(kappa),
                                                   bool(early_stop), kernel)
    return HQQSolution(*out)


def kquant_quantize(x: torch.Tensor, fmt: GGUF, imatrix: Optional[torch.Tensor] = None,
                    kernel: str = "auto") -> torch.Tensor:
    """fp32 CPU weight ``x`` (N, K) and its optional importance ``(K,)`` ->
    llama.cpp's k-quant block bytes uint8 ``(N, K/256 * type_size)``
    (validated by ``pyquant.algorithms.kquant``)."""
    check_kernel_arg(kernel)
    return torch.ops.pyquant.kquant_quantize(x.contiguous(), fmt.type, imatrix, kernel)


__all__ = ["gptq_block_update", "hqq_solve", "hqq_solve_integer_zero", "kquant_quantize"]
