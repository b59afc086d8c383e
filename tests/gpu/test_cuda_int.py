"""CUDA Int dequantize (kernel "cuda_int_dequantize", csrc/cuda/int_dequant.cu)
against the reference, bit for bit (run by benchmarks/gpu_check.sh).

The kernel has a packed 16-bit fast path (4 bits, scales in the output dtype,
integral zero points) and the fp32 path of the spec for everything else; both
must match Int.decode exactly. Every test is named test_cuda_int_dequantize_*.
"""
import pytest
import torch

import pyquant
from pyquant.formats import Int

from tests.gpu._cuda_util import cuda_ext_or_skip, int_weight_cpu, misaligned_copy

pytestmark = pytest.mark.gpu


def _check(qw, dtype, what=""):
    cuda_ext_or_skip()
    ref = pyquant.dequantize(qw, dtype, kernel="reference")
    out = pyquant.dequantize(qw, dtype, kernel="cuda")
    if not torch.equal(out, ref):
        bad = (out != ref).nonzero()
        r, c = bad[0].tolist()
        raise AssertionError(f"{what} {dtype}: {bad.shape[0]} outputs differ; first at ({r}, {c}): "
                             f"{out[r, c].item()} vs {ref[r, c].item()}")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_int_dequantize_bit_exact(bits, group, sym, dtype):
    torch.manual_seed(0)
    qw = pyquant.quantize_weight(torch.randn(70, 300), Int(bits, group, sym)).to("cuda")
    _check(qw, dtype, f"bits={bits} g={group} sym={sym}")


@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("float_zeros", [False, True], ids=["int_zeros", "float_zeros"])
def test_cuda_int_dequantize_every_scale_dtype_and_zero_kind(sdtype, dtype, float_zeros):
    # fast path only where scales are in the output dtype and zeros integral; all bit-exact
    for n, k, group in ((70, 300, 64), (33, 4096, 128), (5, 1000, -1)):
        qw = int_weight_cpu(n, k, 4, group, False, sdtype, 1, float_zeros).to("cuda")
        _check(qw, dtype, f"{n}x{k} g={group} scales={sdtype} float_zeros={float_zeros}")


@pytest.mark.parametrize("k", [32, 40, 31, 1, 4096, 4104])
def test_cuda_int_dequantize_ragged_and_unaligned_rows(k):
    # K % 32 != 0: a partial last chunk; K % 8 != 0: rows not 16-byte aligned (element stores)
    qw = int_weight_cpu(17, k, 4, 32 if k >= 32 else -1, False, torch.float16, 2).to("cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        _check(qw, dtype, f"K={k}")


def test_cuda_int_dequantize_misaligned_qweight_and_many_rows():
    cuda_ext_or_skip()
    qw = int_weight_cpu(70, 300, 4, 32, False, torch.float16, 3).to("cuda")
    t = dict(qw.tensors, qweight=misaligned_copy(qw.tensors["qweight"], 1))
    _check(pyquant.QuantizedWeight(qw.format, t, qw.shape), torch.float16, "misaligned qweight")
    # more rows than one grid dimension holds (65535): the row loop
    big = int_weight_cpu(70000, 64, 4, 64, True, torch.bfloat16, 4).to("cuda")
    _check(big, torch.bfloat16, "70000 rows")


@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_int_dequantize_large_layers(shape):
    for sym in (True, False):
        qw = int_weight_cpu(*shape, 4, 128, sym, torch.float16, 5).to("cuda")
        _check(qw, torch.float16, f"{shape} sym={sym}")
