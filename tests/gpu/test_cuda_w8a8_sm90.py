"""The Hopper W8A8 kernel (``cuda_int8_w8a8_matmul_sm90``: the vectorized
per-token quantizer, then the CUTLASS s8 x u8 wgmma GEMM with the rescale in its
epilogue) against pyquant.ops.reference.w8a8_matmul_reference, bit for bit (both
sides do the same integer and fp32 operations in the same order).

Compute capability 9.0 only. On an H100 an extension built without the CUTLASS
kernels fails these tests (benchmarks/gpu_check.sh must build them); on another
GPU they skip. Every test is named test_cuda_int8_w8a8_matmul_sm90_*.
"""
import pytest
import torch

from pyquant.ops import reference, w8a8_matmul

from tests.gpu._cuda_util import capture_graph, hopper_or_skip, misaligned_copy
from tests.gpu.test_cuda_w8a8 import (_assert_equal, _weight, check_matches_reference,
                                      check_misaligned_weight_and_empty, check_scale_and_bias_dtypes,
                                      check_torch_compile_fullgraph)

pytestmark = pytest.mark.gpu
KERNEL = "cuda_int8_w8a8_matmul_sm90"


def _hopper_or_skip():
    return hopper_or_skip("w8a8_sm90_gemm_cuda", KERNEL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 8), (3, 70), (17, 4096), (130, 1000), (2, 14336)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_int8_w8a8_matmul_sm90_quantizer_bit_exact(shape, dtype):
    _hopper_or_skip()
    from pyquant.ops.backends.cuda_w8a8 import quantize_rows_w8a8_cuda

    m, k = shape
    x = torch.randn(m, k, device="cuda").to(dtype) * 3
    x[0, :] = 0  # an all-zero row: scale 0, codes 0
    q, s, corr = quantize_rows_w8a8_cuda(x)
    q_ref, s_ref = reference.quantize_rows_int8(x)
    assert q.shape == (m, (k + 31) // 32 * 32)
    _assert_equal(s, s_ref, "scales")
    _assert_equal(q[:, :k], q_ref, "codes")
    assert not bool(q[:, k:].any()), "padding columns must be 0"
    assert torch.equal(corr, 128 * q_ref.to(torch.int32).sum(1, dtype=torch.int32)), "corr = 128 * row sums"
    # rows that do not start on 16 bytes take the one-value-per-load path: same bits
    q2, s2, c2 = quantize_rows_w8a8_cuda(misaligned_copy(x, x.element_size()))
    _assert_equal(q2, q, "codes (misaligned x)")
    assert torch.equal(c2, corr)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "mnk",
    [(1, 40, 70), (5, 128, 4096), (64, 264, 1000), (128, 200, 512), (129, 96, 32), (300, 136, 160),
     (16, 4096, 4096), (512, 1024, 2048)],  # both tile shapes and their boundary, ragged M / N / K tiles
    ids=lambda s: "x".join(map(str, s)),
)
def test_cuda_int8_w8a8_matmul_sm90_matches_reference(mnk, dtype):
    _hopper_or_skip()
    check_matches_reference(KERNEL, mnk, dtype, seed=mnk[0])


@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_int8_w8a8_matmul_sm90_scale_and_bias_dtypes(sdtype):
    _hopper_or_skip()
    check_scale_and_bias_dtypes(KERNEL, sdtype)


def test_cuda_int8_w8a8_matmul_sm90_hands_on_what_it_cannot_take():
    # fp32 x and N % 8 != 0 go to the mma.sync kernel: same bits as the spec still
    _hopper_or_skip()
    for n, dtype in ((40, torch.float32), (36, torch.float16)):
        qw = _weight(n, 96)
        x = torch.randn(9, 96, device="cuda").to(dtype)
        _assert_equal(w8a8_matmul(x, qw, kernel=KERNEL), w8a8_matmul(x, qw, kernel="reference"), f"N={n} {dtype}")


def test_cuda_int8_w8a8_matmul_sm90_misaligned_weight_and_empty():
    _hopper_or_skip()
    check_misaligned_weight_and_empty(KERNEL)


def test_cuda_int8_w8a8_matmul_sm90_cuda_graph_capture_and_replay():
    _hopper_or_skip()
    qw = _weight(256, 1024)
    for m in (32, 256):  # both tile shapes (64 x 64 up to M = 128)
        x = torch.randn(m, 1024, device="cuda").half()
        graph, y = capture_graph(lambda: w8a8_matmul(x, qw, kernel=KERNEL))
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        _assert_equal(y, w8a8_matmul(x, qw, kernel="reference"), f"graph replay M={m}")


def test_cuda_int8_w8a8_matmul_sm90_torch_compile_fullgraph():
    _hopper_or_skip()
    check_torch_compile_fullgraph(KERNEL)
