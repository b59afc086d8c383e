"""CUDA tensor-core int4 kernel (kernel "cuda_int4mma_qmatmul", csrc/cuda/int4_mma.cu)
against the float64 reference, on IntMMA weights.

Run by benchmarks/gpu_check.sh on a GPU machine; skipped elsewhere. Every test
is named test_cuda_int4mma_qmatmul_* (see _cuda_util.py).
"""
import math

import pytest
import torch

import pyquant
from pyquant.formats import to_mma
from pyquant.ops.backends import cuda_mma
from pyquant.ops.dispatch import select_kernel

from tests.gpu._cuda_util import (assert_matmul_close, check_qmatmul, check_qmatmul_graph_replays, cuda_ext_or_skip,
                                  int_weight_cpu, misaligned_copy)

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
# ragged N (not a multiple of 16 or of the CTA's 64-256 rows), K not a multiple
# of 8 / 64 / 128, several stages and splits, a ragged last group
SHAPES = [(70, 300), (33, 4160), (256, 1024), (300, 1000)]


def _mma_weight(n, k, group, sym, sdtype=torch.float16, seed=0, float_zeros=False):
    return to_mma(int_weight_cpu(n, k, 4, group, sym, sdtype, seed, float_zeros)).to("cuda")


def _run(m, n, k, group, sym, dtype, sdtype=torch.float16, bias_dtype=None, float_zeros=False, seed=0, x=None):
    cuda_ext_or_skip()
    qw = _mma_weight(n, k, group, sym, sdtype, seed, float_zeros)
    what = f"M={m} N={n} K={k} g={group} sym={sym} {dtype} scales={sdtype}"
    return check_qmatmul(qw, m, dtype, bias_dtype, seed, x, what)


def test_cuda_int4mma_qmatmul_is_selected_by_name():
    cuda_ext_or_skip()
    fmt = to_mma(int_weight_cpu(16, 64, 4, 64, False, torch.float16, 0)).format
    assert select_kernel("qmatmul", fmt, torch.device("cuda"), 64, "cuda").name == "cuda_int4mma_qmatmul"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 7, 16, 29])
def test_cuda_int4mma_qmatmul_matches_reference(m, dtype, sym, group, shape):
    _run(m, *shape, group, sym, dtype)


@pytest.mark.parametrize("m", [1, 2, 8, 9, 16, 17, 24, 32, 33, 48, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_int4mma_qmatmul_every_tile_count_with_bias(m, dtype):
    _run(m, 70, 300, 128, False, dtype, bias_dtype=dtype)
    _run(m, 256, 1024, 64, True, dtype, bias_dtype=torch.float32)


@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_int4mma_qmatmul_scale_dtypes_and_float_zeros(sdtype, dtype):
    _run(4, 70, 300, 32, False, dtype, sdtype=sdtype, float_zeros=True)
    _run(12, 33, 4160, 128, False, dtype, sdtype=sdtype, float_zeros=True, bias_dtype=torch.bfloat16)


def test_cuda_int4mma_qmatmul_act_order():
    cuda_ext_or_skip()
    qw = int_weight_cpu(96, 512, 4, 64, False, torch.float16, 0)
    perm = torch.randperm(512, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    qw = pyquant.QuantizedWeight(pyquant.Int(4, 64, False, torch.float16, True), dict(qw.tensors, perm=perm), qw.shape)
    mma = to_mma(qw).to("cuda")
    x = torch.randn(5, 512, device="cuda").half()
    out = pyquant.qmatmul(x, mma, kernel="cuda")
    assert_matmul_close(out, x, pyquant.dequantize(mma, torch.float32, kernel="reference"), None, "act-order")


@pytest.mark.parametrize("k", [4096, 4104, 300, 31, 1])
def test_cuda_int4mma_qmatmul_x_alignment_and_ragged_k(k):
    cuda_ext_or_skip()
    for offset in (0, 2, 6):
        x = misaligned_copy(torch.randn(3, k, device="cuda").half(), offset)
        _run(3, 48, k, 32 if k >= 32 else -1, False, torch.float16, x=x)


@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_cuda_int4mma_qmatmul_large_layers_deterministic(n, k, m):
    _run(m, n, k, 128, False, torch.float16, bias_dtype=torch.float16)
    qw = _mma_weight(n, k, 128, False)
    x = torch.randn(m, k, device="cuda").half()
    first = pyquant.qmatmul(x, qw, kernel="cuda")
    for _ in range(3):  # split-K partials are summed in split order: bit-identical every time
        assert torch.equal(pyquant.qmatmul(x, qw, kernel="cuda"), first)


@pytest.mark.parametrize("splits", [1, 2, 3, 9])
def test_cuda_int4mma_qmatmul_every_split_count_leaves_tickets_zero(splits):
    from pyquant.ops._dtypes import ptr
    from pyquant.ops.backends.cuda import launch

    cuda_ext_or_skip()
    n, k, m = 300, 1100, 5  # 9 stages of 128
    qw = _mma_weight(n, k, 128, False)
    t = qw.tensors
    x = torch.randn(m, 1104, device="cuda").half()
    x[:, k:] = 0
    out = torch.empty(m, n, device="cuda", dtype=torch.half)
    ws = torch.empty(splits * m * n, device="cuda")
    tickets = torch.zeros(math.ceil(n / cuda_mma.MIN_BLOCK_N), dtype=torch.int32, device="cuda")
    for _ in range(2):
        launch(x.device, "int4_mma_cuda", ptr(x), ptr(t["qweight"]), ptr(t["scales"]), ptr(t["zeros"]), 0,
               ptr(out), ptr(ws), ptr(tickets), m, n, 1104, 128, splits, 1, 0, 1)
        torch.cuda.synchronize()
        assert int(tickets.abs().sum()) == 0
        assert_matmul_close(out, x[:, :k], pyquant.dequantize(qw, torch.float32, kernel="reference"), None,
                            f"splits={splits}")


def test_cuda_int4mma_qmatmul_bad_launches_are_named():
    from pyquant.ops.backends.cuda import launch

    cuda_ext_or_skip()
    dev = torch.device("cuda")
    with pytest.raises(ValueError, match=r"M=65.*M must be in"):
        launch(dev, "int4_mma_cuda", 16, 16, 16, 0, 0, 16, 0, 0, 65, 16, 64, 64, 1, 1, 0, 1)
    with pytest.raises(ValueError, match="empty split"):
        launch(dev, "int4_mma_cuda", 16, 16, 16, 0, 0, 16, 16, 16, 1, 16, 1024, 64, 7, 1, 0, 1)


def test_cuda_int4mma_qmatmul_not_offered_where_it_cannot_run():
    cuda_ext_or_skip()
    dev = torch.device("cuda")
    g128 = to_mma(int_weight_cpu(16, 64, 4, 128, False, torch.float16, 0)).format
    g32 = to_mma(int_weight_cpu(16, 64, 4, 32, False, torch.float16, 0)).format
    f32 = to_mma(int_weight_cpu(16, 64, 4, 64, False, torch.float32, 0)).format
    for fmt, m in ((g128, 65), (g32, 33), (f32, 1)):
        with pytest.raises(pyquant.KernelUnavailableError, match=f"M={m}"):
            select_kernel("qmatmul", fmt, dev, m, "cuda")


def test_cuda_int4mma_qmatmul_fp32_activations_and_empty():
    cuda_ext_or_skip()
    qw = _mma_weight(70, 300, 128, True)
    x = torch.randn(3, 300, device="cuda")
    out = pyquant.qmatmul(x, qw, kernel="cuda")
    assert out.dtype == torch.float32
    assert_matmul_close(out, x, pyquant.dequantize(qw, torch.float32, kernel="reference"), None, "fp32 x")
    assert pyquant.qmatmul(torch.empty(0, 300, device="cuda").half(), qw, kernel="cuda").shape == (0, 70)


def test_cuda_int4mma_qmatmul_cuda_graph_capture_and_replay():
    cuda_ext_or_skip()
    qw = _mma_weight(4096, 4096, 128, False)  # split-K: workspace and tickets inside the graph
    bias = torch.randn(4096, device="cuda").half()
    x = torch.randn(4, 4096, device="cuda").half()
    check_qmatmul_graph_replays(qw, x, bias)
