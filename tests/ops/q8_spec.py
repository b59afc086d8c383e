"""The spec of the CPU int8-activation ("q8") kernels, in plain torch.

Quantizers: ggml's x86 ``quantize_row_q8_0`` / ``q8_1`` and
``quantize_row_q8_K_ref`` (fp32 arithmetic, round half to even), pyquant's
Q8_32 (Q8_0 with the fp32 scale) and its two planes Q8x2_32 for Int and NF4
(x ~ d (q + q2 / 256)). Products: the integer dot
products of those codes with the weight's integer codes, scaled per block, as
ggml's ``vec_dot`` kernels define them (evaluated here in fp64), plus
``magnitude``: the same sums of absolute values, which bounds the fp32
rounding of any summation order.
"""
from __future__ import annotations

from typing import Dict

import torch

from pyquant.formats.gguf_blocks import K_TYPES, unpack_k_blocks, unpack_legacy_blocks

KINDS = {"q8_0": 0, "q8_1": 1, "q8_k": 2, "q8_32": 3, "q8x2_32": 4}
LEGACY_OFFSET = {"Q4_0": 8, "Q4_1": 0, "Q5_0": 16, "Q5_1": 0, "Q8_0": 0}


def act_kind(type_name: str) -> str:
    if type_name in K_TYPES:
        return "q8_k"
    return "q8_1" if type_name in ("Q4_1", "Q5_1") else "q8_0"


def _padded(x: torch.Tensor, block: int) -> torch.Tensor:
    x = x.to(torch.float32)
    k = x.shape[1]
    kp = -(-k // block) * block
    return torch.nn.functional.pad(x, (0, kp - k))


def int_act_span(group_size: int) -> int:
    """32-blocks of x sharing one scale for an Int weight (csrc/cpu/q8_kernels.h):
    a whole group at g64, g128 and g256 (every width), else each block its own."""
    return group_size // 32 if group_size in (64, 128, 256) else 1


def quantize(x: torch.Tensor, kind: str, span: int = 1) -> Dict[str, torch.Tensor]:
    """x (m, k) in any float dtype -> qs int8 (m, kp), d (m, nb), and s / isum
    (32-blocks) or bsums (Q8_K). ``span`` (Q8x2_32): consecutive 32-blocks,
    from the row's start, whose d is their common amax / 127."""
    if kind == "q8_k":
        xb = _padded(x, 256).view(x.shape[0], -1, 256)
        amax = xb.abs().amax(-1)
        vmax = xb.gather(-1, xb.abs().argmax(-1, keepdim=True)).squeeze(-1)  # first of largest magnitude
        zero = amax == 0
        # tensor / tensor: `scalar / tensor` is reciprocal() * scalar in torch, not one division
        iscale = torch.where(zero, torch.ones_like(vmax), torch.full_like(vmax, -127.0) / vmax)
        q = torch.round(iscale.unsqueeze(-1) * xb).clamp(max=127)
        q = torch.where(zero.unsqueeze(-1), torch.zeros_like(q), q)
        d = torch.where(zero, torch.zeros_like(iscale), torch.ones_like(iscale) / iscale)
        qs = q.to(torch.int8)
        bsums = q.view(x.shape[0], -1, 16, 16).sum(-1).to(torch.int16).reshape(x.shape[0], -1)
        return {"qs": qs.reshape(x.shape[0], -1), "d": d, "bsums": bsums}
    xb = _padded(x, 32).view(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1)
    if span > 1:
        nb = amax.shape[1]
        spans = torch.nn.functional.pad(amax, (0, -nb % span)).view(x.shape[0], -1, span).amax(-1)
        amax = spans.repeat_interleave(span, 1)[:, :nb]
    dd = amax / 127.0
    safe = torch.where(amax != 0, amax, torch.ones_like(amax))
    inv = torch.where(amax != 0, torch.full_like(amax, 127.0) / safe, torch.zeros_like(amax))
    q = torch.round(xb * inv.unsqueeze(-1))
    isum = q.sum(-1).to(torch.int32)
    if kind == "q8x2_32":
        # the residual rounded once (an fma: exact in fp64, then rounded to fp32)
        r = (xb.double() - dd.double().unsqueeze(-1) * q.double()).float()
        q2 = torch.round(r * (inv * 256.0).unsqueeze(-1)).clamp(-127, 127)
        isum1 = isum
        isum = 256 * isum + q2.sum(-1).to(torch.int32)  # the sum of the combined codes 256 q + q2
        s = (dd * (1.0 / 256.0)) * isum.to(torch.float32)
        m = x.shape[0]
        return {"qs": q.to(torch.int8).reshape(m, -1), "qs2": q2.to(torch.int8).reshape(m, -1), "d": dd, "s": s,
                "isum": isum, "isum1": isum1}
    s = dd * isum.to(torch.float32)
    d = dd
    if kind in ("q8_0", "q8_1"):
        d = dd.half().float()
        s = s.half().float()
    return {"qs": q.to(torch.int8).reshape(x.shape[0], -1), "d": d, "s": s, "isum": isum}


def _einsum64(eq, *ts):
    return torch.einsum(eq, *(t.double() for t in ts))


def gguf_product(type_name: str, blocks: torch.Tensor, x: torch.Tensor):
    """(y, magnitude), fp64 (m, n): llama.cpp's product of GGUF rows (n, row
    bytes) with x (m, k) quantized as ggml does."""
    n = blocks.shape[0]
    a = quantize(x, act_kind(type_name))
    m = x.shape[0]
    if type_name not in K_TYPES:
        d, mw, codes = unpack_legacy_blocks(type_name, blocks.reshape(-1, _bytes(type_name)))
        nb = codes.shape[0] // n
        q = (codes - LEGACY_OFFSET[type_name]).view(n, nb, 32)
        xq = a["qs"].view(m, nb, 32)
        dot = _einsum64("ibk,nbk->inb", xq, q)
        adot = _einsum64("ibk,nbk->inb", xq.abs(), q.abs())
        dw, dx = d.view(n, nb).double(), a["d"].double()
        y = _einsum64("inb,nb,ib->in", dot, dw, dx)
        mag = _einsum64("inb,nb,ib->in", adot, dw.abs(), dx.abs())
        if mw is not None:
            y = y + _einsum64("nb,ib->in", mw.view(n, nb), a["s"])
            mag = mag + _einsum64("nb,ib->in", mw.view(n, nb).abs(), a["s"].abs())
        return y, mag
    f = unpack_k_blocks(type_name, blocks.reshape(-1, _bytes(type_name)))
    nb = f["codes"].shape[0] // n
    nsub = f["scales"].shape[1]
    sub = 256 // nsub
    q, sc = f["codes"], f["scales"]
    if type_name == "Q3_K":
        q, sc = q - 4, sc - 32
    elif type_name == "Q6_K":
        q = q - 32
    q = q.view(n, nb, nsub, sub)
    sc = sc.view(n, nb, nsub)
    xq = a["qs"].view(m, nb, nsub, sub)
    dot = _einsum64("ibjl,nbjl->inbj", xq, q)
    adot = _einsum64("ibjl,nbjl->inbj", xq.abs(), q.abs())
    isum = _einsum64("inbj,nbj->inb", dot, sc)
    amag = _einsum64("inbj,nbj->inb", adot, sc.abs())
    dw, dx = f["d"].view(n, nb).double(), a["d"].double()
    y = _einsum64("inb,nb,ib->in", isum, dw, dx)
    mag = _einsum64("inb,nb,ib->in", amag, dw.abs(), dx.abs())
    if f["dmin"] is not None:
        bs = a["bsums"].view(m, nb, 16).double()
        if nsub == 8:
            bs = bs.view(m, nb, 8, 2).sum(-1)
        mins = f["mins"].view(n, nb, nsub).double()
        msum = _einsum64("ibj,nbj->inb", bs, mins)
        dmin = f["dmin"].view(n, nb).double()
        y = y - _einsum64("inb,nb,ib->in", msum, dmin, dx)
        mag = mag + _einsum64("inb,nb,ib->in", _einsum64("ibj,nbj->inb", bs.abs(), mins), dmin.abs(), dx.abs())
    return y, mag


def _bytes(type_name: str) -> int:
    from pyquant.formats.gguf import BLOCK_TYPES

    return BLOCK_TYPES[type_name].type_size


def x_hat(x: torch.Tensor, span: int = 1) -> torch.Tensor:
    """x after the two-plane Q8x2_32 round trip (what the Int / NF4 kernels multiply), fp64 (m, kp)."""
    a = quantize(x, "q8x2_32", span)
    m = x.shape[0]
    q = a["qs"].double() + a["qs2"].double() / 256
    return (q.view(m, -1, 32) * a["d"].double().unsqueeze(-1)).view(m, -1)


def int_product(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, fmt, x: torch.Tensor):
    """(y, magnitude) of a weight of the Int format ``fmt``: codes (n, k),
    per-group scales and zeros (n, groups) in their stored dtype, x (m, k) in
    pre-permuted order."""
    n, k = codes.shape
    group = fmt.group_size_for(k)
    xh = x_hat(x, int_act_span(fmt.group_size))[:, :k]
    s = scales.double().repeat_interleave(group, 1)[:, :k]
    z = zeros.double().repeat_interleave(group, 1)[:, :k]
    y = xh @ ((codes.double() - z) * s).T
    mag = xh.abs() @ ((codes.double() + z.abs()) * s.abs()).T
    return y, mag


NF4_R8 = (0, -107, 81, -40, -32, -119, 112, 0, 27, 112, 66, -22, -8, 116, -47, 0)


def nf4_product(codes: torch.Tensor, absmax: torch.Tensor, block: int, x: torch.Tensor):
    """(y, magnitude) of NF4 codes (n, k) with per-block absmax (flat row-major
    blocks) and x (m, k): the codebook in two int8 planes, 127 c ~ c8 + r8 / 256,
    and per 32-block of x: d absmax / (127 * 256) * (256 c8.q + c8.q2 + r8.q)."""
    from pyquant.formats.nf4 import NF4_CODEBOOK

    n, k = codes.shape
    m = x.shape[0]
    c8 = torch.round(torch.tensor(NF4_CODEBOOK, dtype=torch.float64) * 127)[codes.long()]
    r8 = torch.tensor(NF4_R8, dtype=torch.float64)[codes.long()]
    a = absmax.double().repeat_interleave(block)[: n * k].view(n, k)
    q = quantize(x, "q8x2_32")
    q1, q2 = q["qs"][:, :k].double(), q["qs2"][:, :k].double()
    dx = (q["d"].double() / (127 * 256)).repeat_interleave(32, 1)[:, :k]
    y = torch.zeros(m, n, dtype=torch.float64)
    mag = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):  # terms per element, scaled by d_x absmax
        t = (256 * c8 * q1[i] + c8 * q2[i] + r8 * q1[i]) * a * dx[i]
        y[i] = t.sum(1)
        mag[i] = ((256 * c8.abs() * q1[i].abs() + c8.abs() * q2[i].abs() + r8.abs() * q1[i].abs()) * a.abs()
                  * dx[i]).sum(1)
    return y, mag
