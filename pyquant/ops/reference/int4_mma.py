"""The algorithm of the tensor-core int4 kernel ``cuda_int4mma_qmatmul``
(csrc/cuda/int4_mma.cu) in pure torch: what it computes, step for step, in
float64 instead of tensor-core fp32.

The kernel never forms ``W_hat``. Per group ``g`` of K (or per k-range of a
split) it accumulates, for every output row ``n`` and activation row ``m``::

    P[m, n, g] = sum_{k in g} x[m, k] * q[n, k]        (codes as exact fp16/bf16)
    X[m, g]    = sum_{k in g} x[m, k]                  (one extra mma, A = decoded code 1)

and folds the group's scale and zero point in once::

    y[m, n] = sum_g s[n, g] * P[m, n, g] - s[n, g] * z[n, g] * X[m, g]  (+ bias[n])

which is ``x @ W_hat^T`` with ``W_hat = (q - z) * s``: the same op as
``reference.linear.qmatmul``, in the order of the kernel. Act-order weights
take the permuted input ``x[:, perm]`` (the stored columns are ``W[:, perm]``).
The kernel's decode offsets (codes as ``q * 2^-24`` fp16 subnormals, or
``128 + q`` bf16) are exact scalings and shifts of ``q`` that the fold undoes;
tests/ops/test_int4_mma_tensor_core.py checks them against this function.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ...formats import Format
from ...formats.int_mma import IntMMA


def group_sums(x: torch.Tensor, codes: torch.Tensor, group: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``P`` (M, N, G) and ``X`` (M, G) of the module docstring, in float64."""
    m, k = x.shape
    n = codes.shape[0]
    ng = -(-k // group)
    pad = ng * group - k
    xg = torch.nn.functional.pad(x.double(), (0, pad)).view(m, ng, group)
    qg = torch.nn.functional.pad(codes.double(), (0, pad)).view(n, ng, group)
    return torch.einsum("mgk,ngk->mng", xg, qg), xg.sum(-1)


def int4_mma_qmatmul(x: torch.Tensor, qdata: List[torch.Tensor], fmt: Format, shape,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x`` (M, K) @ the IntMMA weight ``qdata`` (+ bias), by per-group folds; output in ``x.dtype``."""
    if not isinstance(fmt, IntMMA):
        raise TypeError(f"int4_mma_qmatmul takes IntMMA weights, got {fmt.spec()}")
    n, k = shape
    t = fmt.plain_tensors(dict(zip(fmt.tensor_specs(tuple(shape)), qdata)), shape)
    codes = fmt.plain().unpack_codes(t["qweight"], shape)
    if fmt.act_order:
        x = x[:, t["perm"].long()]
    p, xs = group_sums(x, codes, fmt.group_size_for(k))
    s = t["scales"].double()
    z = t["zeros"].double() if "zeros" in t else torch.full_like(s, float(fmt.zero_point))
    y = torch.einsum("mng,ng->mn", p, s) - torch.einsum("mg,ng->mn", xs, s * z)
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)
