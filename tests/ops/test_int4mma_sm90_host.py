"""The Hopper int4 kernel's offline parts (no GPU): the arithmetic of its
scale-and-zero fold against the spec, and its host path (what the plan hands
the launcher, which calls it takes) with the extension and the CUDA runtime
stubbed. The index map it reads the weight with is tested in
test_int4mma_sm90_layout.py.
"""
import sys
from pathlib import Path

import pytest
import torch

import pyquant
from pyquant.errors import KernelUnavailableError
from pyquant.formats import Int, IntMMA, QuantizedWeight, to_mma
from pyquant.formats.int_mma import unpack_mma_codes, unpack_mma_scales
from pyquant.ops.backends import cuda_mma_sm90

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _host_stubs  # noqa: E402

KERNEL = "cuda_int4mma_qmatmul_sm90"


def _qw(n, k, group=128, sym=False, act_order=False, sdtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = pyquant.quantize_weight(torch.randn(n, k, generator=g), Int(4, group, sym, sdtype))
    if act_order:
        perm = torch.randperm(k, generator=g).to(torch.int32)
        qw = QuantizedWeight(Int(4, group, sym, sdtype, True), dict(qw.tensors, perm=perm), qw.shape)
    return to_mma(qw)


def _emulate(x, qw, bias):
    """int4mma_sm90.cu's arithmetic in torch: codes to x's dtype (exact), times the
    scale and plus z' = -s z in that dtype (two roundings, CUTLASS's half ops),
    products summed in fp32, + bias in fp32, rounded to x's dtype."""
    n, k = qw.shape
    dt = x.dtype
    scales, zeros = cuda_mma_sm90.cutlass_scales_zeros(qw.tensors, qw.format, n, dt)  # (G, Np)
    codes = unpack_mma_codes(qw.tensors["qweight"], n, k).to(dt)  # (N, K) in stored column order
    group = k if qw.format.group_size == -1 else qw.format.group_size
    gi = torch.arange(k) // group
    s = scales.t()[:n, gi]
    z = zeros.t()[:n, gi]
    w = (codes * s).to(dt) + z
    xs = x if "perm" not in qw.tensors else x.index_select(1, qw.tensors["perm"].long())
    y = xs.float() @ w.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(dt)


def _sqnr(ref, got):
    ref, got = ref.double(), got.double()
    return float(20 * torch.log10(ref.norm() / (ref - got).norm()))


# Measured: fp16 62-64 dB, bf16 43-45 dB (rounding each weight to 16 bits, which any tensor-core kernel does;
# the fp32 spec rounded to the output dtype alone: 73.5 / 55.5 dB).
@pytest.mark.parametrize("dtype, floor", [(torch.float16, 58.0), (torch.bfloat16, 40.0)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("group, sym", [(128, False), (64, True), (-1, False)], ids=["g128-asym", "g64-sym", "pc"])
def test_scale_and_zero_fold_stays_at_the_dtype_s_precision(dtype, floor, group, sym):
    qw = _qw(96, 1000, group, sym)
    x = torch.randn(70, 1000).to(dtype)
    bias = torch.randn(96).to(dtype)
    ref = pyquant.qmatmul(x.float(), qw, bias.float(), kernel="reference")  # the spec in fp32
    got = _emulate(x, qw, bias)
    rounded = ref.to(dtype)  # the best any kernel with this output dtype can do
    assert _sqnr(ref, got) >= floor, (_sqnr(ref, got), _sqnr(ref, rounded))


def test_fold_values():
    qw = _qw(24, 256, 128, sym=False, sdtype=torch.bfloat16)
    scales, zeros = cuda_mma_sm90.cutlass_scales_zeros(qw.tensors, qw.format, 24, torch.float16)
    s = unpack_mma_scales(qw.tensors["scales"], 32).float()
    z = unpack_mma_scales(qw.tensors["zeros"], 32).float()
    assert scales.shape == zeros.shape == (2, 32) and scales.dtype == zeros.dtype == torch.float16
    assert torch.equal(scales.t(), s.half())  # natural row order, padding rows 0
    assert torch.equal(zeros.t(), (-(s.half().float() * z)).half())
    sym = _qw(24, 256, 128, sym=True)
    sc, ze = cuda_mma_sm90.cutlass_scales_zeros(sym.tensors, sym.format, 24, torch.float16)
    assert torch.equal(ze, -8 * sc)  # exact: a power of two


@pytest.mark.parametrize("k, group, kx", [(1000, 128, 1000), (1001, 64, 1008), (512, -1, 512)],
                         ids=["g128", "g64-K%8", "per-channel"])
def test_host_path_hands_the_launcher_the_stored_codes(k, group, kx):
    qw = _qw(48, k, group)
    x = torch.randn(80, k, dtype=torch.float16)
    bias = torch.randn(48, dtype=torch.float16)
    with torch.no_grad(), _host_stubs.hopper_backend_on_cpu() as ext:
        y = pyquant.qmatmul(x, qw, bias, kernel=KERNEL)
    assert y.shape == (80, 48) and y.dtype == torch.float16
    ((name, args),) = ext.calls
    assert name == "int4mma_sm90_gemm_cuda"
    assert args[1] == qw.tensors["qweight"].data_ptr()  # no repacked copy of the codes
    assert (args[0] == x.data_ptr()) == (kx == k)  # x as it is, unless K needs padding to 8
    assert args[6:8] == (0, 0)  # no workspace
    assert args[8:] == (80, 48, kx, kx if group == -1 else group, 1, 0)  # M N K group, fp16, stream 0
    assert all(a % 16 == 0 for a in args[:6] if a)


def test_host_path_gathers_act_order_columns():
    qw = _qw(32, 256, act_order=True)
    x = torch.randn(70, 256, dtype=torch.bfloat16)
    with torch.no_grad(), _host_stubs.hopper_backend_on_cpu() as ext:
        pyquant.qmatmul(x, qw, kernel=KERNEL)
    ((name, args),) = ext.calls
    assert args[0] != x.data_ptr() and args[12] == 2  # a gathered copy; bf16


@pytest.mark.parametrize("what", ["fp32 x", "N % 8"])
def test_host_path_passes_on_what_it_cannot_take(what):
    n, dtype = (48, torch.float32) if what == "fp32 x" else (36, torch.float16)
    qw = _qw(n, 256)
    x = torch.randn(70, 256, generator=torch.Generator().manual_seed(n)).to(dtype)
    with torch.no_grad(), _host_stubs.hopper_backend_on_cpu() as ext:
        y = pyquant.qmatmul(x, qw, kernel=KERNEL)
        assert not [c for c in ext.calls if c[0] == "int4mma_sm90_gemm_cuda"]
        want = x @ pyquant.dequantize(qw, dtype, kernel="reference").T  # the dequantize-then-GEMM path
    assert torch.equal(y, want)


@pytest.mark.parametrize("case", ["M=64", "group 32", "sm_80", "sm_100", "Int layout", "no CUTLASS"])
def test_what_takes_it(case):
    m, group, cap, fmt_cls = 65, 128, (9, 0), IntMMA
    if case == "M=64":
        m = 64  # the Marlin-style kernel's range
    elif case == "group 32":
        group = 32
    elif case == "sm_80":
        cap = (8, 0)
    elif case == "sm_100":
        cap = (10, 0)
    elif case == "Int layout":
        fmt_cls = Int
    fmt = fmt_cls(4, group, False, torch.float16)
    with _host_stubs.hopper_backend_on_cpu(cap, sm90=case != "no CUTLASS"):
        assert not cuda_mma_sm90._ok(fmt, torch.device("cpu"), m)
    with _host_stubs.hopper_backend_on_cpu():
        assert cuda_mma_sm90._ok(IntMMA(4, 128, False, torch.float16), torch.device("cpu"), 65)
        with pytest.raises(KernelUnavailableError, match=KERNEL):  # M = 3: not this kernel's range
            pyquant.qmatmul(torch.randn(3, 256, dtype=torch.float16), _qw(48, 256), kernel=KERNEL)
