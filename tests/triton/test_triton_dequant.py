"""Triton dequantize kernels: bit-exact with the references and the peers.

Without CUDA the kernels run under Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1 is set before the kernels are first imported); with CUDA
the same tests run compiled on the GPU. Shapes are tiny: the interpreter runs
every program of the grid in Python.
"""
import os

import pytest

from tests.deps import require
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
require("triton")

import pyquant  # noqa: E402
from pyquant.formats import GGUF, NF4, Int, QuantizedWeight  # noqa: E402
from pyquant.ops import reference  # noqa: E402
from tests.gguf_testutil import ALL_TYPES, assert_bitexact, gguf_dequantize_np, random_blocks  # noqa: E402

# Kernels whose GPU verification these tests decide (benchmarks/verified.py).
GPU_KERNELS = ("triton_any_dequantize",)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
tk = require("pyquant.triton_kernels")


def int_weight(n, k, fmt: Int, seed=0, device=DEVICE) -> QuantizedWeight:
    """Random codes, scales and (fractional, HQQ-style) zeros in ``fmt``."""
    g = torch.Generator().manual_seed(seed)
    ng = fmt.num_groups(k)
    codes = torch.randint(0, 1 << fmt.bits, (n, k), generator=g)
    scales = torch.rand(n, ng, generator=g) * 0.1 + 0.01
    zeros = None if fmt.symmetric else torch.rand(n, ng, generator=g) * fmt.max_code
    perm = torch.randperm(k, generator=g) if fmt.act_order else None
    return fmt.pack(codes, scales, zeros, perm).to(device)


INT_VARIANTS = {
    # (group, symmetric, scale dtype, act_order, (N, K))
    "g32_sym_fp16": (32, True, torch.float16, False, (5, 96)),
    "g64_asym_bf16_ragged": (64, False, torch.bfloat16, False, (6, 150)),
    "pc_asym_fp32": (-1, False, torch.float32, False, (4, 70)),
    "g128_asym_fp16_actorder_ragged": (128, False, torch.float16, True, (3, 200)),
}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("variant", list(INT_VARIANTS))
def test_int_dequant_bitexact(bits, variant):
    group, sym, sd, act, (n, k) = INT_VARIANTS[variant]
    fmt = Int(bits, group, sym, sd, act)
    qw = int_weight(n, k, fmt, seed=bits)
    out = tk.dequantize(qw.tensor_list(), fmt, qw.shape, torch.float32)
    ref = reference.dequantize(qw.tensor_list(), fmt, qw.shape, torch.float32)
    assert_bitexact(out, ref, f"{fmt.spec()} {qw.shape}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int_dequant_output_dtypes(dtype):
    fmt = Int(4, 32, False, torch.float16)
    qw = int_weight(7, 64, fmt, seed=3)
    out = tk.dequantize(qw.tensor_list(), fmt, qw.shape, dtype)
    ref = reference.dequantize(qw.tensor_list(), fmt, qw.shape, dtype)
    assert_bitexact(out, ref, f"{fmt.spec()} -> {dtype}")


@pytest.mark.parametrize("group,bk", [(32, 32), (64, 32), (32, 64)])
def test_dequant_forced_small_tiles_cover_grid(group, bk):
    # several programs along both axes, ragged in both; BK dividing the group
    # (one scale per row and tile) and not
    fmt = Int(4, group, False, torch.float16)
    qw = int_weight(9, 100, fmt, seed=5)
    cfg = tk.Config(BN=4, BK=bk, SPLIT=1)
    out = tk.dequantize(qw.tensor_list(), fmt, qw.shape, torch.float32, config=cfg)
    assert_bitexact(out, reference.dequantize(qw.tensor_list(), fmt, qw.shape, torch.float32), f"g{group} BK={bk}")


# --- NF4 ----------------------------------------------------------------------
def nf4_weight(n, k, block_size, double_quant, seed=0):
    """NF4 bytes and statistics made by bitsandbytes (the format's peer), and
    the peer's own fp32 dequantization."""
    F = require("bitsandbytes.functional")
    from bitsandbytes.backends.default import ops as bnb_default

    torch.manual_seed(seed)
    w = torch.randn(n, k)
    packed, st = F.quantize_4bit(w, blocksize=block_size, compress_statistics=double_quant, quant_type="nf4")
    if double_quant:
        t = {
            "qweight": packed.view(-1),
            "absmax_q": st.absmax,
            "absmax_scale": st.state2.absmax,
            "absmax_offset": st.offset.reshape(1).float(),
        }
        absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    else:
        t = {"qweight": packed.view(-1), "absmax": st.absmax}
        absmax = st.absmax
    # bitsandbytes' generic (flat) decoder: its native CPU kernel restarts
    # blocks at every row when K is even, which is not the format (CUDA and
    # the default backend treat the weight as one flat array).
    compute = getattr(bnb_default._dequantize_4bit_compute, "__wrapped__", bnb_default._dequantize_4bit_compute)
    from pyquant.formats.nf4 import NF4_CODEBOOK

    peer = compute(packed.view(-1), absmax.float(), torch.tensor(NF4_CODEBOOK), block_size, (n, k), torch.float32)
    return QuantizedWeight(NF4(block_size, double_quant), t, (n, k)), peer


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("block_size,shape", [(64, (5, 64)), (128, (5, 64)), (64, (3, 67))])
def test_nf4_dequant_bitexact(block_size, shape, double_quant):
    qw, peer = nf4_weight(*shape, block_size, double_quant, seed=block_size + shape[1])
    qw = qw.to(DEVICE)
    out = tk.dequantize(qw.tensor_list(), qw.format, qw.shape, torch.float32)
    assert_bitexact(out, peer, f"{qw.format.spec()} {shape} vs bitsandbytes")
    ref = reference.dequantize(qw.tensor_list(), qw.format, qw.shape, torch.float32)
    assert_bitexact(out, ref, f"{qw.format.spec()} {shape} vs reference")


@pytest.mark.parametrize("block_size,bk", [(64, 32), (128, 64)])
def test_nf4_dequant_row_aligned_blocks(block_size, bk):
    # K a multiple of the block and BK dividing it: the one-absmax-per-row-and-tile path
    qw, peer = nf4_weight(6, 2 * block_size, block_size, True, seed=bk)
    qw = qw.to(DEVICE)
    out = tk.dequantize(qw.tensor_list(), qw.format, qw.shape, torch.float32, config=tk.Config(BN=4, BK=bk, SPLIT=1))
    assert_bitexact(out, peer, f"{qw.format.spec()} BK={bk}")


# --- GGUF ---------------------------------------------------------------------
@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_gguf_dequant_bitexact(type_name):
    fmt = GGUF(type_name)
    n, nb = 3, 2
    g = torch.Generator().manual_seed(sum(map(ord, type_name)))
    blocks = random_blocks(type_name, n * nb, g).view(n, -1)
    qw = QuantizedWeight(fmt, {"blocks": blocks}, (n, nb * fmt.block.block_size)).to(DEVICE)
    out = tk.dequantize(qw.tensor_list(), fmt, qw.shape, torch.float32)
    assert_bitexact(out, reference.dequantize(qw.tensor_list(), fmt, qw.shape, torch.float32), f"{type_name} vs ref")
    peer = gguf_dequantize_np(type_name, blocks).view(qw.shape)
    assert_bitexact(out, peer.to(out.device), f"{type_name} vs gguf-py")


# --- public API -----------------------------------------------------------------
def test_public_dequantize_reaches_triton():
    fmt = Int(4, 64, False, torch.float16)
    qw = int_weight(5, 100, fmt, seed=11)
    out = pyquant.dequantize(qw, torch.bfloat16, kernel="triton")
    assert_bitexact(out, reference.dequantize(qw.tensor_list(), fmt, qw.shape, torch.bfloat16), "public")
    fmt = GGUF("Q4_K")
    blocks = random_blocks("Q4_K", 2, torch.Generator().manual_seed(1)).view(2, -1)
    qw = QuantizedWeight(fmt, {"blocks": blocks}, (2, 256)).to(DEVICE)
    out = pyquant.dequantize(qw, torch.float32, kernel="triton")
    assert_bitexact(out, reference.dequantize(qw.tensor_list(), fmt, qw.shape, torch.float32), "public Q4_K")
