"""Format -> kernel arguments, and the choice between generic and word-wise kernels.

Host side, no device work: pointers, sizes and constexprs come from the format and
the shape. The NF4 tables are copied to a device once per device (the first eager
call), after which every launch is CUDA-graph capturable.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..decode import FMT_GGUF, FMT_INT, FMT_NF4

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

_TABLES: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}


def nf4_tables(device: torch.device):
    """(NF4 codebook fp32 [16], signed dynamic map fp32 [256]) on ``device``."""
    key = str(device)
    t = _TABLES.get(key)
    if t is None:
        from pyquant.formats.nf4 import dynamic_map, nf4_codebook

        t = _TABLES[key] = (nf4_codebook(device), dynamic_map(device))
    return t


def format_args(fmt, qdata, shape):
    """-> (6 pointer tensors, 2 ints, (FMT, C0, C1, C2), perm or None) for ``w_tile``."""
    t = dict(zip(fmt.tensor_specs(shape), qdata))
    n, k = shape
    fam = fmt.family
    if fam == "int":
        q, s = t["qweight"], t["scales"]
        ptrs = (q, s, t.get("zeros", s), q, q, q)
        ints = (fmt.packed_row_bytes(k), fmt.num_groups(k))
        gshift = 0 if fmt.group_size == -1 else fmt.group_size.bit_length() - 1
        return ptrs, ints, (FMT_INT, fmt.bits, int(not fmt.symmetric), gshift), t.get("perm")
    if fam == "nf4":
        q = t["qweight"]
        cb, dmap = nf4_tables(q.device)
        if fmt.double_quant:
            ptrs = (q, t["absmax_q"], t["absmax_scale"], t["absmax_offset"], cb, dmap)
        else:
            ptrs = (q, t["absmax"], q, q, cb, dmap)
        return ptrs, (0, 0), (FMT_NF4, fmt.block_size, int(fmt.double_quant), 0), None
    if fam == "gguf":
        b = t["blocks"]
        bt = fmt.block
        return (b,) * 6, (k // bt.block_size * bt.type_size, 0), (FMT_GGUF, bt.ggml_type, 0, 0), None
    raise NotImplementedError(f"no Triton decoder for format {fmt.spec()}")


def uniform_groups(fmt, k: int, bk: int) -> bool:
    """Does every BK-aligned K tile lie inside one scale group (Int) or one
    absmax block (NF4)? Then the kernels load one scale per row and tile."""
    if fmt.family == "int":
        return fmt.group_size == -1 or fmt.group_size % bk == 0
    if fmt.family == "nf4":
        return k % fmt.block_size == 0 and fmt.block_size % bk == 0
    return False


def packed_int(fmt) -> bool:
    """Int4 / Int8: the word-wise kernels (32-bit weight loads, per-chunk scales)."""
    return fmt.family == "int" and fmt.bits in (4, 8)


def packed_gemv(fmt, k: int) -> bool:
    """Formats the word-wise GEMV serves: Int4 / Int8, and NF4 when every row is a
    whole number of 32-code chunks (16-byte aligned) and of absmax blocks."""
    if fmt.family == "nf4":
        return k % 32 == 0 and k % fmt.block_size == 0
    return packed_int(fmt)


def gemv_packed_args(fmt, qdata, shape):
    """-> (qweight, sc, zr, aux0, aux1, aux2), (row bytes, groups per row), constexprs
    of ``gemv_packed_kernel``."""
    n, k = shape
    t = dict(zip(fmt.tensor_specs(shape), qdata))
    q = t["qweight"]
    if fmt.family == "nf4":
        cb, dmap = nf4_tables(q.device)
        bs = fmt.block_size
        if fmt.double_quant:
            am = (t["absmax_q"], t["absmax_scale"], t["absmax_offset"])
        else:
            am = (t["absmax"], q, q)
        consts = dict(BITS=4, HAS_ZERO=False, GSHIFT=bs.bit_length() - 1, NF4=True, DQ=fmt.double_quant)
        return (q, am[0], am[1], am[2], cb, dmap), (k // 2, k // bs), consts
    sc = t["scales"]
    gshift = 0 if fmt.group_size == -1 else fmt.group_size.bit_length() - 1
    consts = dict(BITS=fmt.bits, HAS_ZERO=not fmt.symmetric, GSHIFT=gshift, NF4=False, DQ=False)
    return (q, sc, t.get("zeros", sc), q, q, q), (fmt.packed_row_bytes(k), fmt.num_groups(k)), consts


def packed_path(path: str, fmt, k: int) -> bool:
    """Does ``path`` run a word-wise kernel for this format (its own configs)?"""
    if path == "gemv":
        return packed_gemv(fmt, k)
    return path in ("splitk", "gemm") and packed_int(fmt)


def mm_bk(fmt, k: int, bk: int) -> int:
    """BK of the word-wise tensor-core kernel: whole 32-code chunks, at least 32
    (two k16 MMA steps), and a divisor of the group size so that one scale per row
    covers the tile."""
    bk = max(32, bk)
    if fmt.group_size != -1:
        bk = min(bk, fmt.group_size)
    return bk


def scale_weights(fmt, bm: int, bk: int) -> bool:
    """Word-wise tensor-core kernel: scale the decoded [BN, BK] weight tile (one
    multiply-add per weight, weights rounded to the activation dtype once, as a
    dequantize-then-matmul would) rather than the [BM, BN] dot of the exact codes
    after each K tile (3 BM / BK per weight). Per channel the scale is applied once
    after the loop either way."""
    return fmt.group_size != -1 and (bm > 16 or bk < 64)


def x16_mode(x: torch.Tensor, m: int, k: int) -> int:
    """X16 of the word-wise GEMV: 1 fp16 / 2 bf16 activations read 4 at a time
    (8-byte loads: every row 8-byte aligned), else 0 (one load per element)."""
    code = {torch.float16: 1, torch.bfloat16: 2}.get(x.dtype, 0)
    if code and x.data_ptr() % 8 == 0 and (m == 1 or k % 4 == 0):
        return code
    return 0
