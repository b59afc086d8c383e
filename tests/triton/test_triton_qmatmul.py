"""Triton fused dequant-matmul: every path (GEMV, split-K, GEMM) against the reference.

``y = x @ W_hat.T (+ bias)`` is compared with the fp32 reference product
(``reference.qmatmul`` on ``x.float()``): per-dtype element-wise tolerance and
an SQNR floor, worst case in the message. Paths are forced with small configs
so that every program/split/tail branch runs on tiny shapes: N = 40 is ragged
for BN in {16, 32}, K = 200 ragged for BK in {32, 64} and for group 128.
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
from pyquant.ops import dispatch, reference  # noqa: E402
from tests.gguf_testutil import random_blocks  # noqa: E402
from tests.triton.test_triton_dequant import int_weight  # noqa: E402,F401  (test_triton_packed imports it from here)

# Kernels whose GPU verification these tests decide (benchmarks/verified.py).
GPU_KERNELS = ("triton_any_qmatmul_gemv", "triton_any_qmatmul_splitk", "triton_any_qmatmul_gemm")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
tk = require("pyquant.triton_kernels")
Config = tk.Config

# (rtol, atol as a fraction of max |y|, SQNR floor dB) vs the fp32 reference.
# fp16/bf16 paths round the decoded weight to the activation dtype before the
# tensor-core dot and round the output; fp32 uses IEEE fp32 dots.
TOL = {
    torch.float32: (1e-5, 1e-5, 110.0),
    torch.float16: (2e-3, 2e-3, 60.0),
    torch.bfloat16: (1.6e-2, 1.6e-2, 45.0),
}


def sqnr(ref, approx) -> float:
    ref, approx = ref.double(), approx.double()
    err = (ref - approx).norm()
    return float("inf") if err == 0 else float(20 * torch.log10(ref.norm() / err))


def ref_weight(qw):
    """fp32 W_hat from the reference (the format's own decode)."""
    return reference.dequantize_fp32(qw.format, qw.tensor_list(), qw.shape)


def check(y, x, qw, bias, what):
    assert y.dtype == x.dtype and y.shape == (x.shape[0], qw.shape[0]), what
    ref = x.float() @ ref_weight(qw).T
    if bias is not None:
        ref = ref + bias.float()
    rtol, afrac, floor = TOL[x.dtype]
    yf = y.float()
    err = (yf - ref).abs()
    bound = rtol * ref.abs() + afrac * ref.abs().max()
    worst = int((err - bound).argmax())
    s = sqnr(ref, yf)
    assert bool((err <= bound).all()), (
        f"{what}: worst |y-ref| {err.view(-1)[worst]:.3g} > bound {bound.view(-1)[worst]:.3g} "
        f"(y={yf.view(-1)[worst]:.5g}, ref={ref.view(-1)[worst]:.5g}); SQNR {s:.1f} dB"
    )
    assert s >= floor, f"{what}: SQNR {s:.1f} dB < {floor} dB"


# --- weights ------------------------------------------------------------------
def nf4_weight(n, k, fmt, seed=0):
    F = require("bitsandbytes.functional")
    torch.manual_seed(seed)
    packed, st = F.quantize_4bit(torch.randn(n, k), blocksize=fmt.block_size,
                                 compress_statistics=fmt.double_quant, quant_type="nf4")
    if fmt.double_quant:
        t = {"qweight": packed.view(-1), "absmax_q": st.absmax, "absmax_scale": st.state2.absmax,
             "absmax_offset": st.offset.reshape(1).float()}
    else:
        t = {"qweight": packed.view(-1), "absmax": st.absmax}
    return QuantizedWeight(fmt, t, (n, k)).to(DEVICE)


# small fp16 scales so that random GGUF blocks decode to weights of a sane size
_GGUF_SCALES = (0.004, -0.003, 0.0025, 0.006, -0.005, 0.0015)


def gguf_weight(n, k, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    nb = k // fmt.block.block_size
    blocks = random_blocks(fmt.type, n * nb, g, fp16_values=_GGUF_SCALES).view(n, -1)
    if fmt.type in ("Q6_K",):  # int8 sub-block scales: keep them small too
        blocks.view(n * nb, -1)[:, 192:208] = torch.randint(0, 16, (n * nb, 16), generator=g).to(torch.uint8)
    return QuantizedWeight(fmt, {"blocks": blocks}, (n, k)).to(DEVICE)


def make_weight(fmt, n, k, seed=0):
    if isinstance(fmt, Int):
        return int_weight(n, k, fmt, seed)
    if isinstance(fmt, NF4):
        return nf4_weight(n, k, fmt, seed)
    return gguf_weight(n, k, fmt, seed)


def rand_x(m, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype).to(DEVICE)


# --- every required format on every path ----------------------------------------
FORMATS = {
    "int4_g32_sym": (Int(4, 32, True, torch.float16), 200),
    "int4_g128_asym_ragged": (Int(4, 128, False, torch.bfloat16), 200),
    "int4_pc_asym": (Int(4, -1, False, torch.float16), 200),
    "int8_g64_asym": (Int(8, 64, False, torch.float16), 200),
    "int8_pc_sym": (Int(8, -1, True, torch.bfloat16), 200),
    "nf4_b64": (NF4(64), 200),
    "nf4_b64_dq_oddk": (NF4(64, True), 99),
    "nf4_b64_dq_rowblocks": (NF4(64, True), 192),  # K % 64 == 0: one absmax per row and tile
    "q4_k": (GGUF("Q4_K"), 256),
    "q6_k": (GGUF("Q6_K"), 256),
    "q8_0": (GGUF("Q8_0"), 224),
}
N = 40
# (M, forced config): GEMV with two K splits; split-K with three; GEMM with a
# grid of 2 x 3 tiles, the last of each ragged
PATHS = {
    "gemv": (3, Config(BN=16, BK=64, SPLIT=2)),
    "splitk": (5, Config(BM=16, BN=32, BK=32, SPLIT=3)),
    "gemm": (20, Config(BM=16, BN=16, BK=32, SPLIT=1, GROUP_M=2)),
}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", list(FORMATS))
def test_qmatmul_paths(name, path):
    fmt, k = FORMATS[name]
    i = list(FORMATS).index(name) + list(PATHS).index(path)
    dtype = DTYPES[i % 3]  # rotate activation dtypes: every format/path sees two of them
    m, cfg = PATHS[path]
    qw = make_weight(fmt, N, k, seed=i)
    x = rand_x(m, k, dtype, seed=i)
    bias = torch.randn(N).to(DEVICE) if i % 2 else None
    y = tk.qmatmul(x, qw.tensor_list(), fmt, qw.shape, bias, path=path, config=cfg)
    check(y, x, qw, bias, f"{name} {path} M={m} {dtype} bias={bias is not None}")


@pytest.mark.parametrize("path", ["gemv", "splitk"])
def test_qmatmul_act_order(path):
    fmt = Int(4, 32, False, torch.float16, act_order=True)
    qw = make_weight(fmt, N, 96, seed=7)
    m, cfg = PATHS[path]
    x = rand_x(m, 96, torch.float16, seed=7)
    y = tk.qmatmul(x, qw.tensor_list(), fmt, qw.shape, None, path=path, config=cfg)
    check(y, x, qw, None, f"act_order {path}")


@pytest.mark.parametrize("fmt", [Int(2, 32, False), Int(3, 64, True), GGUF("Q4_0"), GGUF("Q4_1"), GGUF("Q5_0"),
                                 GGUF("Q5_1"), GGUF("Q2_K"), GGUF("Q3_K"), GGUF("Q5_K")], ids=str)
def test_qmatmul_other_formats_gemv(fmt):
    k = 256 if isinstance(fmt, GGUF) else 100
    qw = make_weight(fmt, 24, k, seed=3)
    x = rand_x(2, k, torch.float16, seed=3)
    y = tk.qmatmul(x, qw.tensor_list(), fmt, qw.shape, None, path="gemv")
    check(y, x, qw, None, f"{fmt.spec()} gemv")


def test_splitk_is_deterministic_and_matches_unsplit():
    fmt = Int(4, 32, True, torch.float16)
    qw = make_weight(fmt, N, 200, seed=5)
    x = rand_x(6, 200, torch.float32, seed=5)
    args = (x, qw.tensor_list(), fmt, qw.shape, None)
    y1 = tk.qmatmul(*args, path="splitk", config=Config(BM=16, BN=64, BK=32, SPLIT=4))
    y2 = tk.qmatmul(*args, path="splitk", config=Config(BM=16, BN=64, BK=32, SPLIT=4))
    y3 = tk.qmatmul(*args, path="splitk", config=Config(BM=16, BN=64, BK=32, SPLIT=1))
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, y3, rtol=1e-5, atol=1e-5)


def test_empty_m():
    fmt = Int(8, 64, False)
    qw = make_weight(fmt, 8, 64)
    y = tk.qmatmul(torch.empty(0, 64, device=DEVICE), qw.tensor_list(), fmt, qw.shape)
    assert y.shape == (0, 8)


# --- public API -------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 6, 70])
def test_public_qmatmul_reaches_each_path(m):
    # default configs, path chosen from M by dispatch (triton_gemv / _splitk / _gemm)
    fmt = Int(4, 64, False, torch.float16)
    qw = make_weight(fmt, 24, 128, seed=m)
    x = rand_x(m, 128, torch.float16, seed=m)
    bias = torch.randn(24).to(DEVICE)
    kern = dispatch.select_kernel("qmatmul", fmt, x.device, m, "triton")
    assert kern.name == {1: "triton_any_qmatmul_gemv", 6: "triton_any_qmatmul_splitk", 70: "triton_any_qmatmul_gemm"}[m]
    y = pyquant.qmatmul(x.view(1, m, 128), qw, bias, kernel="triton")
    assert y.shape == (1, m, 24)
    check(y.view(m, 24), x, qw, bias, f"public M={m}")


def test_default_dispatch_needs_verification(monkeypatch):
    fmt = Int(4, 128)
    cuda = torch.device("cuda")
    # Not listed in verified_kernels.json: never chosen by default on a GPU.
    monkeypatch.setattr(dispatch, "verified_kernels", lambda: frozenset())
    assert dispatch.select_kernel("qmatmul", fmt, cuda, 1).backend in ("cuda", "dequant", "reference")
    monkeypatch.setattr(dispatch, "verified_kernels", lambda: frozenset({"triton_any_qmatmul_gemv", "triton_any_dequantize"}))
    if dispatch.select_kernel("qmatmul", fmt, cuda, 1).backend != "cuda":
        assert dispatch.select_kernel("qmatmul", fmt, cuda, 1).name == "triton_any_qmatmul_gemv"
        assert dispatch.select_kernel("qmatmul", fmt, cuda, 8).name != "triton_splitk"
    # CPU default order never includes Triton.
    assert dispatch.select_kernel("qmatmul", fmt, torch.device("cpu"), 1).backend in ("cpu", "reference")


def test_cpu_needs_interpreter(monkeypatch):
    from pyquant.errors import KernelUnavailableError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError):
        dispatch.select_kernel("qmatmul", Int(4, 128), torch.device("cpu"), 1, "triton")


def test_compile_fullgraph():
    fmt = Int(4, 32, True, torch.float16)
    qw = make_weight(fmt, 16, 64, seed=2)
    x = rand_x(2, 64, torch.float16, seed=2)

    def f(x):
        return pyquant.qmatmul(x, qw, kernel="triton") * 2

    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(y, f(x), rtol=0, atol=0)
