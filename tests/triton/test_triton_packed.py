"""Word-wise Int4/Int8 kernels (``triton_kernels/matmul/gemv_packed.py``, ``mm_packed.py``): every code path.

GEMV (``gemv_packed_kernel``): unmasked full K tiles with the next tile prefetched,
the masked ragged tail, 8-byte fp16/bf16 activation loads (X16) and the per-element
fallback (fp32 or misaligned x), 1..4 activation rows per program and several row
blocks (M > 4 forced onto the GEMV path), K splits, per-chunk and per-channel scales.
NF4 on the same GEMV (rows of whole 16-byte chunks and absmax blocks; levels
read from a 16-entry table). Tensor cores (``mm_int_kernel``): the dot of exact codes scaled per tile (BM = 16),
the scaled weight tile (``scale_weights``), per channel, act-order, ragged K.

Compared with the fp32 reference product as in ``test_triton_qmatmul`` (same
tolerances); shapes are tiny because the interpreter runs every program in Python.
"""
import os

import pytest

from tests.deps import require
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
require("triton")

from pyquant.formats import NF4, Int  # noqa: E402
from pyquant.ops.backends import triton as triton_backend  # noqa: E402,F401  (makes pyquant.triton_kernels importable)
from tests.triton.test_triton_qmatmul import DEVICE, check, int_weight, nf4_weight, rand_x  # noqa: E402

# Kernels whose GPU verification these tests decide (benchmarks/verified.py).
GPU_KERNELS = ("triton_any_qmatmul_gemv", "triton_any_qmatmul_splitk", "triton_any_qmatmul_gemm")

tk = require("pyquant.triton_kernels")
from pyquant.triton_kernels.matmul import args as _args  # noqa: E402
from pyquant.triton_kernels.tuning import configs  # noqa: E402

Config = tk.Config

FMTS = {
    "int4_g64_asym": Int(4, 64, False, torch.float16),
    "int4_g32_sym_bf16s": Int(4, 32, True, torch.bfloat16),
    "int4_pc_asym": Int(4, -1, False, torch.float32),
    "int8_g128_asym": Int(8, 128, False, torch.float16),
    "int8_pc_sym": Int(8, -1, True, torch.float16),
}


# --- GEMV -----------------------------------------------------------------------
# (M, x dtype, K, config): K = 320 with BK = 64 is 5 full tiles (prefetch chain, the
# last prefetch clamped) and no tail; K = 200 adds a 8-column tail in a partly
# filled chunk; K = 40 is a tail only. BN = 8 with N = 20 leaves a ragged row tile.
GEMV_CASES = {
    "m1_fp16_full": (1, torch.float16, 320, Config(BN=8, BK=64, SPLIT=1, num_warps=1)),
    "m1_bf16_tail": (1, torch.bfloat16, 200, Config(BN=8, BK=64, SPLIT=1, num_warps=1)),
    "m2_fp32_split": (2, torch.float32, 200, Config(BN=8, BK=32, SPLIT=3, num_warps=1)),
    "m3_fp16_split": (3, torch.float16, 320, Config(BN=8, BK=64, SPLIT=2, num_warps=1)),
    "m4_bf16_tailonly": (4, torch.bfloat16, 40, Config(BN=8, BK=64, SPLIT=1, num_warps=1)),
}


@pytest.mark.parametrize("case", list(GEMV_CASES))
@pytest.mark.parametrize("name", list(FMTS))
def test_packed_gemv(name, case):
    fmt = FMTS[name]
    m, dtype, k, cfg = GEMV_CASES[case]
    seed = list(FMTS).index(name) * 10 + list(GEMV_CASES).index(case)
    qw = int_weight(20, k, fmt, seed=seed)
    x = rand_x(m, k, dtype, seed=seed)
    bias = torch.randn(20).to(DEVICE) if seed % 2 else None
    y = tk.qmatmul(x, qw.tensor_list(), fmt, qw.shape, bias, path="gemv", config=cfg)
    check(y, x, qw, bias, f"{name} gemv {case}")


def test_packed_gemv_misaligned_x_and_many_rows():
    # x starting 2 bytes into its buffer cannot be read 8 bytes at a time (X16 = 0),
    # and M = 6 on the GEMV path takes two row blocks of up to 4 rows
    fmt = Int(4, 32, False, torch.float16)
    k = 96
    qw = int_weight(12, k, fmt, seed=1)
    buf = rand_x(1, 6 * k + 1, torch.float16, seed=1).view(-1)
    x = buf[1:].view(6, k)
    assert _args.x16_mode(x, 6, k) == 0 and _args.x16_mode(x[:1].clone(), 1, k) == 1
    y = tk.qmatmul(x, qw.tensor_list(), fmt, qw.shape, None, path="gemv",
                   config=Config(BN=4, BK=32, SPLIT=1, num_warps=1))
    check(y, x, qw, None, "misaligned x, M=6 gemv")


def test_packed_gemv_act_order_tail():
    fmt = Int(8, 32, False, torch.float16, act_order=True)
    qw = int_weight(10, 72, fmt, seed=4)
    x = rand_x(2, 72, torch.bfloat16, seed=4)
    y = tk.qmatmul(x, qw.tensor_list(), fmt, qw.shape, None, path="gemv",
                   config=Config(BN=8, BK=32, SPLIT=1, num_warps=1))
    check(y, x, qw, None, "int8 act_order gemv")


def test_packed_gemv_default_config_chooses_no_split_for_wide_n():
    # the shipped M = 1 config fills an H100 (132 SMs) from N alone at N = 4096
    cfg = configs.default_config("gemv", 1, packed=True)
    tiles = -(-4096 // cfg.BN)
    assert configs.resolve_split(cfg, tiles, 4096, 132, waves=1)[0] == 1
    # ... and splits K when N is small
    assert configs.resolve_split(cfg, -(-512 // cfg.BN), 4096, 132, waves=1)[0] > 1


# (NF4 format, K, M, x dtype, config): tails and splits as above; block 32 = one
# chunk, block 128 = four chunks of a thread block-row
NF4_CASES = {
    "b64_m1_fp16_tail": (NF4(64), 320, 1, torch.float16, Config(BN=8, BK=128, SPLIT=1, num_warps=1)),
    "b64dq_m3_bf16_split": (NF4(64, True), 256, 3, torch.bfloat16, Config(BN=8, BK=64, SPLIT=2, num_warps=1)),
    "b128dq_m2_fp32": (NF4(128, True), 384, 2, torch.float32, Config(BN=8, BK=128, SPLIT=1, num_warps=1)),
    "b32_m1_bf16_full": (NF4(32), 256, 1, torch.bfloat16, Config(BN=8, BK=64, SPLIT=1, num_warps=1)),
}


@pytest.mark.parametrize("case", list(NF4_CASES))
def test_packed_gemv_nf4(case):
    fmt, k, m, dtype, cfg = NF4_CASES[case]
    assert _args.packed_gemv(fmt, k)
    seed = 50 + list(NF4_CASES).index(case)
    qw = nf4_weight(20, k, fmt, seed=seed)
    x = rand_x(m, k, dtype, seed=seed)
    bias = torch.randn(20).to(DEVICE) if seed % 2 else None
    y = tk.qmatmul(x, qw.tensor_list(), fmt, qw.shape, bias, path="gemv", config=cfg)
    check(y, x, qw, bias, f"nf4 gemv {case}")


def test_nf4_rows_not_whole_chunks_use_the_generic_gemv():
    assert not _args.packed_gemv(NF4(64), 200) and not _args.packed_gemv(NF4(64), 96)
    assert _args.packed_gemv(NF4(64), 192) and not _args.packed_path("splitk", NF4(64), 192)


# --- tensor cores -----------------------------------------------------------------
# (M, x dtype, K, config, expected scale_weights)
MM_CASES = {
    "dot_then_scale": (5, torch.float16, 200, Config(BM=16, BN=16, BK=64, SPLIT=2), False),
    "dot_then_scale_bf16": (7, torch.bfloat16, 128, Config(BM=16, BN=32, BK=128, SPLIT=1), False),
    "scaled_tile": (20, torch.bfloat16, 200, Config(BM=32, BN=16, BK=64, SPLIT=1), True),
    "scaled_tile_fp32": (18, torch.float32, 96, Config(BM=16, BN=16, BK=32, SPLIT=2), True),
}


@pytest.mark.parametrize("case", list(MM_CASES))
@pytest.mark.parametrize("name", ["int4_g64_asym", "int4_g32_sym_bf16s", "int4_pc_asym", "int8_g128_asym"])
def test_packed_mm(name, case):
    fmt = FMTS[name]
    m, dtype, k, cfg, scaled = MM_CASES[case]
    bk = _args.mm_bk(fmt, k, cfg.BK)
    assert bk % 32 == 0 and (fmt.group_size == -1 or fmt.group_size % bk == 0)
    if fmt.group_size != -1 and bk == cfg.BK:
        assert _args.scale_weights(fmt, cfg.BM, bk) == scaled
    seed = 100 + list(FMTS).index(name) * 10 + list(MM_CASES).index(case)
    qw = int_weight(24, k, fmt, seed=seed)
    x = rand_x(m, k, dtype, seed=seed)
    bias = torch.randn(24).to(DEVICE) if seed % 2 else None
    y = tk.qmatmul(x, qw.tensor_list(), fmt, qw.shape, bias, path="splitk", config=cfg)
    check(y, x, qw, bias, f"{name} mm {case}")


def test_packed_mm_act_order_and_gemm_path():
    fmt = Int(4, 64, True, torch.float16, act_order=True)
    qw = int_weight(16, 160, fmt, seed=9)
    x = rand_x(17, 160, torch.float16, seed=9)
    for path, cfg in (("splitk", Config(BM=16, BN=16, BK=64, SPLIT=2)),
                      ("gemm", Config(BM=16, BN=16, BK=64, SPLIT=1, GROUP_M=2))):
        y = tk.qmatmul(x, qw.tensor_list(), fmt, qw.shape, None, path=path, config=cfg)
        check(y, x, qw, None, f"act_order {path}")


def test_mm_bk_and_scale_rule():
    g128, g32, pc = Int(4, 128), Int(4, 32), Int(8, -1)
    assert _args.mm_bk(g128, 4096, 256) == 128 and _args.mm_bk(g32, 4096, 128) == 32
    assert _args.mm_bk(pc, 4096, 16) == 32 and _args.mm_bk(pc, 4096, 256) == 256
    assert not _args.scale_weights(g128, 16, 128) and _args.scale_weights(g128, 64, 64)
    assert _args.scale_weights(g32, 16, 32) and not _args.scale_weights(pc, 64, 64)


def test_packed_tail_reads_no_scales_past_the_row():
    # a K tile much wider than K: chunks past K must not read scales/zeros of the
    # next rows or past the tensors (here NaN right after them in memory)
    fmt = Int(4, 32, False, torch.float16)
    qw = int_weight(8, 40, fmt, seed=6)
    t = dict(qw.tensors)
    for name in ("scales", "zeros"):
        buf = torch.full((t[name].numel() + 64,), float("nan"), dtype=t[name].dtype, device=DEVICE)
        buf[: t[name].numel()] = t[name].reshape(-1)
        t[name] = buf[: t[name].numel()].view(t[name].shape)
    qdata = [t[n] for n in fmt.tensor_specs(qw.shape)]
    x = rand_x(1, 40, torch.float16, seed=6)
    for path, cfg in (("gemv", Config(BN=8, BK=256, SPLIT=1, num_warps=1)),
                      ("splitk", Config(BM=16, BN=16, BK=32, SPLIT=1))):
        y = tk.qmatmul(x, qdata, fmt, qw.shape, None, path=path, config=cfg)
        check(y, x, qw, None, f"wide tail {path}")
