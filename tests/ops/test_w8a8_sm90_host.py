"""The Hopper W8A8 kernel's offline parts (no GPU): the arithmetic of its
s8 x u8 GEMM and epilogue against the spec, and its host path (what it hands the
two launchers, and which calls it passes on to the mma.sync kernel) with the
extension and the CUDA runtime stubbed.
"""
import sys
from pathlib import Path

import pytest
import torch

import pyquant
from pyquant.errors import KernelUnavailableError
from pyquant.formats import Int
from pyquant.ops import reference, w8a8_matmul


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _host_stubs  # noqa: E402

KERNEL = "cuda_int8_w8a8_matmul_sm90"


def _qw(n, k, sdtype=torch.float16, seed=0):
    torch.manual_seed(seed)
    return pyquant.quantize_weight(torch.randn(n, k), Int(8, -1, True, sdtype))


def _emulate_sm90(x, qw, bias):
    """w8a8_sm90.cu's arithmetic in torch: the unsigned codes as stored, the
    quantizer's corr = 128 * row sums, acc_u - corr in int32, then the epilogue's
    ops one rounding at a time, in its order."""
    n, k = qw.shape
    kp = qw.format.packed_row_bytes(k)
    q, sa = reference.quantize_rows_int8(x)
    qa = torch.zeros(x.shape[0], kp, dtype=torch.int64)
    qa[:, :k] = q.to(torch.int64)
    w_u = qw.tensors["qweight"].to(torch.int64)  # (N, kp), padding codes 0
    corr = 128 * qa.sum(1, keepdim=True)
    acc = (qa @ w_u.T - corr).to(torch.int32)  # exact: every partial sum fits int64
    y = acc.to(torch.float32) * sa.unsqueeze(1)
    y = y * qw.tensors["scales"].reshape(n).to(torch.float32).unsqueeze(0)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mnk", [(1, 40, 70), (7, 64, 1000), (33, 24, 4096)], ids=lambda s: "x".join(map(str, s)))
def test_unsigned_codes_minus_corr_give_the_spec_bits(mnk, dtype):
    m, n, k = mnk
    qw = _qw(n, k, seed=m)
    x = (torch.randn(m, k) * 3).to(dtype)
    x[0, : k // 2] = 0
    bias = torch.randn(n).to(dtype)
    for b in (None, bias):
        want = w8a8_matmul(x, qw, b, kernel="reference")
        assert torch.equal(_emulate_sm90(x, qw, b), want), (mnk, dtype, b is not None)


def test_host_path_hands_the_launchers_one_consistent_set_of_buffers():
    qw = _qw(48, 300, torch.bfloat16)
    x = torch.randn(5, 300, dtype=torch.float16)
    bias = torch.randn(48, dtype=torch.float16)
    with torch.no_grad(), _host_stubs.hopper_backend_on_cpu() as ext:
        y = w8a8_matmul(x, qw, bias, kernel=KERNEL)
    assert y.shape == (5, 48) and y.dtype == torch.float16
    (qname, qargs), (gname, gargs) = ext.calls
    assert qname == "quantize_rows_w8a8_cuda" and gname == "w8a8_sm90_gemm_cuda"
    kp = qw.format.packed_row_bytes(300)
    assert qargs[0] == x.data_ptr() and qargs[4:] == (5, 300, kp, 1, 0)  # M K kp, fp16 x, stream 0
    q_ptr, scale_ptr, corr_ptr = qargs[1:4]
    assert gargs[:3] == (q_ptr, scale_ptr, corr_ptr)  # the quantizer's outputs feed the GEMM
    assert gargs[3] == qw.tensors["qweight"].data_ptr()  # the codes as stored: no repacked copy
    assert gargs[4] != qw.tensors["scales"].data_ptr() and gargs[5] not in (0, bias.data_ptr())  # fp32 copies
    assert gargs[4] % 16 == 0 and gargs[5] % 16 == 0
    assert gargs[6] == y.data_ptr() and gargs[7:] == (0, 0, 5, 48, kp, 1, 0)  # no workspace; M N kp, fp16 out


@pytest.mark.parametrize("n, dtype", [(40, torch.float32), (36, torch.float16)], ids=["fp32-x", "N=36"])
def test_host_path_passes_on_what_the_tma_store_cannot_take(n, dtype):
    qw = _qw(n, 96)
    x = torch.randn(3, 96, dtype=dtype)
    with torch.no_grad(), _host_stubs.hopper_backend_on_cpu() as ext:
        w8a8_matmul(x, qw, kernel=KERNEL)
    assert [c[0] for c in ext.calls] == ["quantize_rows_int8_cuda", "w8a8_gemm_cuda"]


def test_only_compute_capability_9_0_takes_it():
    qw = _qw(48, 96)
    x = torch.randn(3, 96, dtype=torch.float16)
    with torch.no_grad(), _host_stubs.hopper_backend_on_cpu((8, 0)) as ext:
        with pytest.raises(KernelUnavailableError, match=KERNEL):
            w8a8_matmul(x, qw, kernel=KERNEL)
        w8a8_matmul(x, qw, kernel="cuda")  # the backend's next kernel takes it
    assert [c[0] for c in ext.calls] == ["quantize_rows_int8_cuda", "w8a8_gemm_cuda"]
    with torch.no_grad(), _host_stubs.hopper_backend_on_cpu((10, 0)):
        with pytest.raises(KernelUnavailableError):
            w8a8_matmul(x, qw, kernel=KERNEL)  # sm_90a code does not run on later parts either


def test_an_extension_without_the_cutlass_kernels_does_not_offer_it():
    qw = _qw(48, 96)
    x = torch.randn(3, 96, dtype=torch.float16)
    with torch.no_grad(), _host_stubs.hopper_backend_on_cpu(sm90=False) as ext:
        with pytest.raises(KernelUnavailableError, match=KERNEL):
            w8a8_matmul(x, qw, kernel=KERNEL)
        w8a8_matmul(x, qw, kernel="cuda")
    assert [c[0] for c in ext.calls] == ["quantize_rows_int8_cuda", "w8a8_gemm_cuda"]


def test_rows_too_wide_for_int32_sums_take_the_spec():
    from pyquant.ops.backends.cuda_w8a8 import MAX_KP

    k = MAX_KP + 100  # 127 * 128 * K would wrap an int32 sum
    qw = _qw(8, k)
    x = torch.randn(2, k, dtype=torch.float16)
    with torch.no_grad(), _host_stubs.hopper_backend_on_cpu() as ext:
        for kernel in (KERNEL, "cuda_int8_w8a8_matmul"):
            y = w8a8_matmul(x, qw, kernel=kernel)
            assert torch.equal(y, w8a8_matmul(x, qw, kernel="reference")), kernel
    assert not ext.calls  # no launch
