"""CUDA C++ kernels against the reference (run by benchmarks/gpu_check.sh)."""
import pytest
import torch

import pyquant
from pyquant.formats import Int

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_int_dequantize_bit_exact(bits, group, sym, dtype):
    torch.manual_seed(0)
    qw = pyquant.quantize_weight(torch.randn(70, 300), Int(bits, group, sym)).to("cuda")
    ref = pyquant.dequantize(qw, dtype, kernel="reference")
    out = pyquant.dequantize(qw, dtype, kernel="cuda")
    assert torch.equal(out, ref)
