"""The Hopper int4 kernel (``cuda_int4mma_qmatmul_sm90``: CUTLASS's mixed-input
GEMM reading IntMMA weights in place, csrc/cuda/int4mma_sm90.cu) against the
float64 reference, for M > 64.

It rounds each dequantized weight (s * q + z') to x's dtype before the tensor
cores, as CUTLASS's mixed-input collective does, so the bound is an SQNR floor
(tests/ops/test_int4mma_sm90_host.py measures the same arithmetic on the CPU:
fp16 62-64 dB, bf16 43-45 dB), not the per-output bound of the kernels that
scale after the MMA.

Compute capability 9.0 only. On an H100 an extension built without the CUTLASS
kernels fails these tests (benchmarks/gpu_check.sh must build them); on another
GPU they skip. Every test is named test_cuda_int4mma_qmatmul_sm90_*.
"""
import pytest
import torch

import pyquant
from pyquant.formats import to_mma
from pyquant.ops.dispatch import select_kernel

from tests.gpu._cuda_util import capture_graph, hopper_or_skip, int_weight_cpu

pytestmark = pytest.mark.gpu
KERNEL = "cuda_int4mma_qmatmul_sm90"
FLOOR_DB = {torch.float16: 55.0, torch.bfloat16: 38.0}


def _hopper_or_skip():
    return hopper_or_skip("int4mma_sm90_gemm_cuda", KERNEL)


def _weight(n, k, group, sym, sdtype=torch.float16, seed=0, float_zeros=False):
    return to_mma(int_weight_cpu(n, k, 4, group, sym, sdtype, seed, float_zeros)).to("cuda")


def _check(qw, x, bias=None, what=""):
    out = pyquant.qmatmul(x, qw, bias, kernel=KERNEL)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], qw.shape[0])
    w = pyquant.dequantize(qw, torch.float64, kernel="reference")
    ref = x.double() @ w.T + (0 if bias is None else bias.double())
    err = (out.double() - ref).norm()
    sqnr = float(20 * torch.log10(ref.norm() / err)) if err > 0 else float("inf")
    assert sqnr >= FLOOR_DB[x.dtype], f"{what}: SQNR {sqnr:.1f} dB < {FLOOR_DB[x.dtype]} dB"
    return out


def test_cuda_int4mma_qmatmul_sm90_takes_m_above_64():
    _hopper_or_skip()
    fmt = _weight(64, 256, 128, False).format
    assert select_kernel("qmatmul", fmt, torch.device("cuda"), 65, "cuda").name == KERNEL
    assert select_kernel("qmatmul", fmt, torch.device("cuda"), 64, "cuda").name == "cuda_int4mma_qmatmul"


@pytest.mark.parametrize("shape", [(96, 1000), (256, 4096), (1024, 512)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("group", [64, 128, -1])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [65, 300])
def test_cuda_int4mma_qmatmul_sm90_matches_reference(m, dtype, sym, group, shape):
    _hopper_or_skip()
    n, k = shape
    qw = _weight(n, k, group, sym, seed=m)
    x = torch.randn(m, k, device="cuda").to(dtype)
    _check(qw, x, what=f"M={m} N={n} K={k} g={group} sym={sym} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_int4mma_qmatmul_sm90_bias_scale_dtypes_float_zeros(dtype):
    _hopper_or_skip()
    qw = _weight(200, 640, 128, False, sdtype=torch.bfloat16, float_zeros=True)
    x = torch.randn(130, 640, device="cuda").to(dtype)
    _check(qw, x, torch.randn(200, device="cuda"), "fp32 bias, bf16 scales, float zeros")
    _check(qw, x, torch.randn(200, device="cuda").to(dtype), "bias in x's dtype")


def test_cuda_int4mma_qmatmul_sm90_act_order_and_ragged_k():
    _hopper_or_skip()
    base = int_weight_cpu(96, 1001, 4, 64, False, torch.float16, 0)
    perm = torch.randperm(1001, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    qw = pyquant.QuantizedWeight(pyquant.Int(4, 64, False, torch.float16, True), dict(base.tensors, perm=perm),
                                 base.shape)
    _check(to_mma(qw).to("cuda"), torch.randn(100, 1001, device="cuda").half(), what="act-order, K = 1001")


def test_cuda_int4mma_qmatmul_sm90_large():
    _hopper_or_skip()
    qw = _weight(4096, 4096, 128, False)
    x = torch.randn(2048, 4096, device="cuda").half()
    _check(qw, x, what="2048 x 4096 x 4096")


@pytest.mark.parametrize("n, dtype", [(36, torch.float16), (64, torch.float32)], ids=["N=36", "fp32-x"])
def test_cuda_int4mma_qmatmul_sm90_hands_on_what_it_cannot_take(n, dtype):
    _hopper_or_skip()
    qw = _weight(n, 256, 128, False)
    x = torch.randn(80, 256, device="cuda").to(dtype)
    out = pyquant.qmatmul(x, qw, kernel=KERNEL)
    want = x.double() @ pyquant.dequantize(qw, torch.float64, kernel="reference").T
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)


def test_cuda_int4mma_qmatmul_sm90_cuda_graph_capture_and_replay():
    _hopper_or_skip()
    qw = _weight(256, 1024, 128, False)
    x = torch.randn(128, 1024, device="cuda").half()
    pyquant.qmatmul(x, qw, kernel=KERNEL)  # the plan's scale copies are made outside capture
    graph, y = capture_graph(lambda: pyquant.qmatmul(x, qw, kernel=KERNEL))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, pyquant.qmatmul(x, qw, kernel=KERNEL), rtol=0, atol=0)
