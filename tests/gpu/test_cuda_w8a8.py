"""CUDA W8A8 (kernel "cuda_int8_w8a8_matmul": per-token int8 quantizer + int8
tensor-core GEMM) against pyquant.ops.reference.w8a8_matmul_reference.

Both sides do the same integer and fp32 operations in the same order, so the
results are compared bit for bit. Every test is named test_cuda_int8_w8a8_matmul_*
and names its kernel (``kernel="cuda"`` would take the Hopper kernel on an H100:
tests/gpu/test_cuda_w8a8_sm90.py).
"""
import pytest
import torch

import pyquant
from pyquant.ops import reference, w8a8_matmul

from tests.gpu._cuda_util import capture_graph, cuda_ext_or_skip, int_weight_cpu, misaligned_copy

pytestmark = pytest.mark.gpu


def _weight(n, k, sdtype=torch.float16, seed=0):
    return int_weight_cpu(n, k, 8, -1, True, sdtype, seed).to("cuda")


def _assert_equal(out, ref, what):
    if not torch.equal(out, ref):
        diff = (out.double() - ref.double()).abs()
        i = int(torch.argmax(diff))
        r, c = divmod(i, out.shape[-1])
        raise AssertionError(
            f"{what}: {int((diff > 0).sum())} of {out.numel()} differ; worst at ({r}, {c}): "
            f"{out.reshape(-1, out.shape[-1])[r, c].item()} vs {ref.reshape(-1, ref.shape[-1])[r, c].item()}"
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 70), (17, 4096), (130, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_int8_w8a8_matmul_quantize_rows_bit_exact(shape, dtype):
    cuda_ext_or_skip()
    from pyquant.ops.backends.cuda_w8a8 import quantize_rows_int8_cuda

    m, k = shape
    x = torch.randn(m, k, device="cuda").to(dtype) * 3
    x[0, :] = 0  # an all-zero row: scale 0, codes 0
    q, s = quantize_rows_int8_cuda(x)
    q_ref, s_ref = reference.quantize_rows_int8(x)
    assert q.shape == (m, (k + 31) // 32 * 32)
    _assert_equal(s, s_ref, "scales")
    _assert_equal(q[:, :k], q_ref, "codes")
    assert not bool(q[:, k:].any()), "padding columns must be 0"
    # misaligned rows of x read the same values
    q2, s2 = quantize_rows_int8_cuda(misaligned_copy(x, x.element_size()))
    _assert_equal(q2, q, "codes (misaligned x)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "mnk", [(1, 40, 70), (5, 128, 4096), (64, 257, 1000), (100, 96, 32), (300, 130, 160)],
    ids=lambda s: "x".join(map(str, s)),
)
def check_matches_reference(kernel, mnk, dtype, seed=0):
    m, n, k = mnk
    qw = _weight(n, k, seed=seed)
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    for b in (None, bias):
        out = w8a8_matmul(x, qw, b, kernel=kernel)
        ref = w8a8_matmul(x, qw, b, kernel="reference")
        _assert_equal(out, ref, f"M={m} N={n} K={k} {dtype} bias={b is not None}")


def check_scale_and_bias_dtypes(kernel, sdtype):
    qw = _weight(200, 640, sdtype, seed=2)
    x = torch.randn(2, 7, 640, device="cuda").half()
    bias = torch.randn(200, device="cuda")  # fp32 bias with fp16 x
    out = w8a8_matmul(x, qw, bias, kernel=kernel)
    assert out.shape == (2, 7, 200) and out.dtype == torch.float16
    _assert_equal(out, w8a8_matmul(x, qw, bias, kernel="reference"), f"scales {sdtype}")


def check_torch_compile_fullgraph(kernel):
    qw = _weight(128, 512)
    x = torch.randn(4, 512, device="cuda").bfloat16()

    def f(x):
        return w8a8_matmul(x, qw, kernel=kernel) + 1

    compiled = torch.compile(f, fullgraph=True)
    _assert_equal(compiled(x), f(x), "compiled")


def test_cuda_int8_w8a8_matmul_matches_reference(mnk, dtype):
    cuda_ext_or_skip()
    check_matches_reference("cuda_int8_w8a8_matmul", mnk, dtype)


@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_int8_w8a8_matmul_scale_and_bias_dtypes(sdtype):
    cuda_ext_or_skip()
    check_scale_and_bias_dtypes("cuda_int8_w8a8_matmul", sdtype)


def test_cuda_int8_w8a8_matmul_close_to_float_matmul():
    # Sanity of the whole scheme (not just agreement with the spec).
    cuda_ext_or_skip()
    qw = _weight(512, 2048)
    x = torch.randn(16, 2048, device="cuda")
    out = w8a8_matmul(x, qw, kernel="cuda_int8_w8a8_matmul")
    ref = x @ pyquant.dequantize(qw, torch.float32).T
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.02, rel


def check_misaligned_weight_and_empty(kernel):
    qw = _weight(64, 96)
    tensors = dict(qw.tensors)
    tensors["qweight"] = misaligned_copy(tensors["qweight"], 4)
    qw2 = pyquant.QuantizedWeight(qw.format, tensors, qw.shape)
    x = torch.randn(9, 96, device="cuda").bfloat16()
    _assert_equal(w8a8_matmul(x, qw2, kernel=kernel), w8a8_matmul(x, qw, kernel="reference"), "misaligned weight")
    assert w8a8_matmul(x[:0], qw, kernel=kernel).shape == (0, 64)


def test_cuda_int8_w8a8_matmul_misaligned_weight_and_empty():
    cuda_ext_or_skip()
    check_misaligned_weight_and_empty("cuda_int8_w8a8_matmul")


def test_cuda_int8_w8a8_matmul_cuda_graph_capture_and_replay():
    cuda_ext_or_skip()
    qw = _weight(256, 1024)
    x = torch.randn(32, 1024, device="cuda").half()
    graph, y = capture_graph(lambda: w8a8_matmul(x, qw, kernel="cuda_int8_w8a8_matmul"))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    _assert_equal(y, w8a8_matmul(x, qw, kernel="reference"), "graph replay")


def test_cuda_int8_w8a8_matmul_torch_compile_fullgraph():
    cuda_ext_or_skip()
    check_torch_compile_fullgraph("cuda_int8_w8a8_matmul")
