"""The pure-torch specification of every op.

Every backend (CPU C++, Triton, CUDA) is tested against these functions on the
same inputs. They favour clarity over speed, run on any device, and compute in
fp32: ``dequantize`` returns exactly the fp32 values a kernel must produce
(then cast to the requested dtype), ``qmatmul`` is ``x @ W_hat.T + bias``
accumulated in fp32 and cast to the activation dtype.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..formats import GGUF, NF4, Format, Int
from ..formats.int_format import pack_codes, unpack_codes
from ..formats.int_format import CHUNK  # noqa: F401  (documented layout constant)


def _named(fmt: Format, qdata: List[torch.Tensor], shape) -> dict:
    return dict(zip(fmt.tensor_specs(shape).keys(), qdata))


def int_dequantize(fmt: Int, t: dict, shape) -> torch.Tensor:
    n, k = shape
    codes = unpack_codes(t["qweight"], fmt.bits, k).to(torch.float32)
    g = fmt.group_size_for(k)
    scales = t["scales"].to(torch.float32).repeat_interleave(g, dim=1)[:, :k]
    if fmt.symmetric:
        w = (codes - float(fmt.zero_point)) * scales
    else:
        zeros = t["zeros"].to(torch.float32).repeat_interleave(g, dim=1)[:, :k]
        w = (codes - zeros) * scales
    if fmt.act_order:
        out = torch.empty_like(w)
        out[:, t["perm"].long()] = w
        w = out
    return w


def dequantize_fp32(fmt: Format, qdata: List[torch.Tensor], shape) -> torch.Tensor:
    """The fp32 weight ``(N, K)`` that ``qdata`` encodes."""
    t = _named(fmt, qdata, shape)
    if isinstance(fmt, Int):
        return int_dequantize(fmt, t, shape)
    if isinstance(fmt, NF4):
        from .reference_nf4 import nf4_dequantize

        return nf4_dequantize(fmt, t, shape)
    if isinstance(fmt, GGUF):
        from .reference_gguf import gguf_dequantize

        return gguf_dequantize(fmt, t, shape)
    raise NotImplementedError(f"no reference dequantize for {fmt.spec()}")


def dequantize(qdata: List[torch.Tensor], fmt: Format, shape, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_fp32(fmt, qdata, shape).to(dtype)


def qmatmul(
    x: torch.Tensor, qdata: List[torch.Tensor], fmt: Format, shape, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    w = dequantize_fp32(fmt, qdata, shape)
    y = x.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def pack(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    if isinstance(fmt, Int):
        return pack_codes(codes, fmt.bits)
    if isinstance(fmt, NF4):
        from .reference_nf4 import nf4_pack_codes

        return nf4_pack_codes(codes)
    raise NotImplementedError(f"pack is defined for code formats (Int, NF4), not {fmt.spec()}")


def unpack(packed: torch.Tensor, fmt: Format, shape) -> torch.Tensor:
    if isinstance(fmt, Int):
        return unpack_codes(packed, fmt.bits, shape[1])
    if isinstance(fmt, NF4):
        from .reference_nf4 import nf4_unpack_codes

        return nf4_unpack_codes(packed, shape[0] * shape[1]).view(shape)
    raise NotImplementedError(f"unpack is defined for code formats (Int, NF4), not {fmt.spec()}")
