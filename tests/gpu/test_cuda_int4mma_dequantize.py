"""CUDA IntMMA dequantize (kernel "cuda_int4mma_dequantize", csrc/cuda/int4_mma_dequant.cu)
against IntMMA.decode, bit for bit (run by benchmarks/gpu_check.sh).
Every test is named test_cuda_int4mma_dequantize_*."""
import pytest
import torch

import pyquant
from pyquant.formats import to_mma

from tests.gpu._cuda_util import cuda_ext_or_skip, int_weight_cpu

pytestmark = pytest.mark.gpu


def _check(qw, dtype, what):
    cuda_ext_or_skip()
    ref = pyquant.dequantize(qw, dtype, kernel="reference")
    out = pyquant.dequantize(qw, dtype, kernel="cuda")
    assert out.dtype == dtype and out.shape == qw.shape
    if not torch.equal(out, ref):
        bad = (out != ref).nonzero()
        r, c = bad[0].tolist()
        raise AssertionError(f"{what} {dtype}: {bad.shape[0]} differ; first ({r}, {c}): {out[r, c].item()} vs "
                             f"{ref[r, c].item()}")


@pytest.mark.parametrize("shape", [(70, 300), (16, 64), (33, 4160), (5, 31)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_int4mma_dequantize_bit_exact(shape, group, sym, sdtype):
    n, k = shape
    g = group if k >= 32 or group == -1 else -1
    qw = to_mma(int_weight_cpu(n, k, 4, g, sym, sdtype, 0, float_zeros=not sym)).to("cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        _check(qw, dtype, f"{shape} g={g} sym={sym} scales={sdtype}")


def test_cuda_int4mma_dequantize_act_order_and_large():
    cuda_ext_or_skip()
    qw = int_weight_cpu(96, 511, 4, 64, False, torch.float16, 1)
    perm = torch.randperm(511, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    qw = pyquant.QuantizedWeight(pyquant.Int(4, 64, False, torch.float16, True), dict(qw.tensors, perm=perm), qw.shape)
    _check(to_mma(qw).to("cuda"), torch.bfloat16, "act-order")
    _check(to_mma(int_weight_cpu(4096, 4096, 4, 128, False, torch.float16, 2)).to("cuda"), torch.float16, "4096^2")


def test_cuda_int4mma_dequantize_feeds_the_large_m_path():
    # M > 64: dispatch takes dequantize-then-GEMM, whose dequantize is this kernel
    cuda_ext_or_skip()
    qw = to_mma(int_weight_cpu(256, 1024, 4, 128, False, torch.float16, 3)).to("cuda")
    x = torch.randn(300, 1024, device="cuda").half()
    y = pyquant.qmatmul(x, qw, kernel="dequant")
    w = pyquant.dequantize(qw, torch.float16, kernel="cuda")
    torch.testing.assert_close(y, x @ w.T, rtol=0, atol=0)
