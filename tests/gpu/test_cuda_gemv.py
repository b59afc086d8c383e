"""CUDA INT4 GEMV (kernel "cuda_int4_qmatmul_gemv") against the reference.

Run by benchmarks/gpu_check.sh on a GPU machine; skipped elsewhere.
Every test function is named test_cuda_int4_qmatmul_gemv_* (see _cuda_util.py).
"""
import pytest
import torch

import pyquant
from pyquant.ops.dispatch import select_kernel

from tests.gpu._cuda_util import (check_qmatmul, check_qmatmul_graph_replays, cuda_ext_or_skip, int_weight_cpu,
                                  misaligned_copy)

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
GROUPS = [32, 64, 128, -1]
# (N, K): ragged K (not a multiple of 32 or 8), N not a multiple of the 16-row
# block, several 1024-wide K tiles with a partial last one, a ragged last group.
SHAPES = [(70, 300), (33, 4160), (256, 1024)]


def _run(m, n, k, group, sym, dtype, sdtype=torch.float16, bias_dtype=None, float_zeros=False, seed=0, x=None):
    cuda_ext_or_skip()
    qw = int_weight_cpu(n, k, 4, group, sym, sdtype, seed, float_zeros).to("cuda")
    what = f"M={m} N={n} K={k} g={group} sym={sym} {dtype} scales={sdtype}"
    return check_qmatmul(qw, m, dtype, bias_dtype, seed, x, what)


def test_cuda_int4_qmatmul_gemv_is_selected_by_name():
    cuda_ext_or_skip()
    fmt = pyquant.Int(4, 128, False)
    assert select_kernel("qmatmul", fmt, torch.device("cuda"), 8, "cuda").name == "cuda_int4_qmatmul_gemv"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_cuda_int4_qmatmul_gemv_matches_reference(m, dtype, sym, group, shape):
    _run(m, *shape, group, sym, dtype)


@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_int4_qmatmul_gemv_every_m_with_bias(m, dtype):
    _run(m, 70, 300, 128, False, dtype, bias_dtype=dtype)
    _run(m, 256, 1024, 64, True, dtype, bias_dtype=torch.float32)


@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_int4_qmatmul_gemv_scale_and_activation_dtypes(sdtype, dtype):
    _run(4, 70, 300, 32, False, dtype, sdtype=sdtype)
    _run(2, 33, 4160, 128, True, dtype, sdtype=sdtype, bias_dtype=torch.bfloat16)


@pytest.mark.parametrize("group", [64, -1])
def test_cuda_int4_qmatmul_gemv_float_zero_points(group):
    _run(5, 70, 300, group, False, torch.float16, float_zeros=True)
    _run(1, 33, 4160, group, False, torch.bfloat16, float_zeros=True)


@pytest.mark.parametrize("k", [4096, 4104, 300, 31, 1])
def test_cuda_int4_qmatmul_gemv_x_alignment_paths(k):
    # 16-byte aligned rows take the vector staging path, the rest the scalar one.
    cuda_ext_or_skip()
    for offset in (0, 2, 6):
        x = torch.randn(3, k, device="cuda").half()
        xm = misaligned_copy(x, offset)
        _run(3, 48, k, 32 if k >= 32 else -1, False, torch.float16, x=xm)


def test_cuda_int4_qmatmul_gemv_misaligned_qweight():
    cuda_ext_or_skip()
    qw = int_weight_cpu(70, 300, 4, 32, False, torch.float16, 3).to("cuda")
    tensors = dict(qw.tensors)
    tensors["qweight"] = misaligned_copy(tensors["qweight"], 1)
    qw2 = pyquant.QuantizedWeight(qw.format, tensors, qw.shape)
    assert qw2.tensors["qweight"].data_ptr() % 16 == 1
    x = torch.randn(2, 300, device="cuda").half()
    torch.testing.assert_close(pyquant.qmatmul(x, qw2, kernel="cuda"), pyquant.qmatmul(x, qw, kernel="cuda"),
                               rtol=0, atol=0)


def test_cuda_int4_qmatmul_gemv_large_layer():
    # Llama-3-8B q_proj-like shape: many blocks, four K tiles.
    for m in (1, 8):
        _run(m, 4096, 4096, 128, False, torch.float16, bias_dtype=torch.float16)


def test_cuda_int4_qmatmul_gemv_batch_dims_and_empty():
    cuda_ext_or_skip()
    qw = int_weight_cpu(70, 300, 4, 128, True, torch.float16, 0).to("cuda")
    x = torch.randn(2, 3, 300, device="cuda").bfloat16()
    _run(6, 70, 300, 128, True, torch.bfloat16, x=x)
    empty = pyquant.qmatmul(torch.empty(0, 300, device="cuda").half(), qw, kernel="cuda")
    assert empty.shape == (0, 70)


def test_cuda_int4_qmatmul_gemv_not_offered_beyond_m8_or_other_bits():
    cuda_ext_or_skip()
    dev = torch.device("cuda")
    with pytest.raises(pyquant.KernelUnavailableError):
        select_kernel("qmatmul", pyquant.Int(4, 128), dev, 9, "cuda")
    with pytest.raises(pyquant.KernelUnavailableError):
        select_kernel("qmatmul", pyquant.Int(8, 128), dev, 1, "cuda")


def test_cuda_int4_qmatmul_gemv_cuda_graph_capture_and_replay():
    cuda_ext_or_skip()
    qw = int_weight_cpu(256, 1024, 4, 128, False, torch.float16, 0).to("cuda")
    bias = torch.randn(256, device="cuda").half()
    x = torch.randn(4, 1024, device="cuda").half()
    check_qmatmul_graph_replays(qw, x, bias)


def test_cuda_int4_qmatmul_gemv_torch_compile_fullgraph():
    cuda_ext_or_skip()
    qw = int_weight_cpu(256, 1024, 4, 64, True, torch.bfloat16, 0).to("cuda")
    x = torch.randn(3, 1024, device="cuda").bfloat16()

    def f(x):
        return torch.relu(pyquant.qmatmul(x, qw, kernel="cuda")) * 2

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)
