"""Helpers of the CUDA kernel tests (not collected: no test_ prefix).

Test naming rule used by benchmarks/verified.py: a test of kernel ``K`` is a
function named ``test_K_...`` (``K`` = the name given to ``register_kernel``),
so a GPU run can tell which kernels passed all of their tests.
"""
from __future__ import annotations

import functools

import torch

import pyquant
from pyquant.formats import Int, QuantizedWeight

EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


def cuda_ext_or_skip():
    """The extension with its CUDA kernels. On a machine with a CUDA device a build
    without them is a failure (a broken or CPU-only build must not pass the GPU run
    as "all skipped"); elsewhere the test skips."""
    import pytest

    from pyquant import _ext

    ext = _ext.load()
    if ext is None or not ext.cuda_compiled():
        what = "pyquant._C is missing" if ext is None else "pyquant._C was built without CUDA"
        if torch.cuda.is_available():
            pytest.fail(f"{what} on a machine with a CUDA device: build it with PYQUANT_CUDA=1")
        pytest.skip(what)
    return ext


def hopper_or_skip(entry: str, kernel: str):
    """The extension, on a compute-capability 9.0 GPU with the sm_90a CUTLASS kernel
    ``entry`` built: skips on another GPU (sm_90a code runs on 9.0 only) and fails
    on an H100 whose build lacks it (benchmarks/gpu_check.sh must build it)."""
    import pytest

    ext = cuda_ext_or_skip()
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"{kernel} is sm_90a code; this GPU is {torch.cuda.get_device_name()}")
    if not hasattr(ext, entry):
        pytest.fail("pyquant._C was built without the sm_90a CUTLASS kernels (nvidia-cutlass not found at build time)")
    return ext


@functools.lru_cache(maxsize=None)
def int_weight_cpu(n: int, k: int, bits: int, group: int, sym: bool, sdtype: torch.dtype, seed: int,
                   float_zeros: bool = False) -> QuantizedWeight:
    """An RTN-quantized random weight; ``float_zeros`` replaces the zero points
    by non-integral values (HQQ-style) to exercise that path."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    qw = pyquant.quantize_weight(w, Int(bits, group, sym, sdtype))
    if float_zeros:
        assert not sym
        tensors = dict(qw.tensors)
        z = tensors["zeros"].float()
        tensors["zeros"] = (z + torch.rand(z.shape, generator=g) - 0.5).to(sdtype)
        qw = QuantizedWeight(qw.format, tensors, qw.shape)
    return qw


def misaligned_copy(t: torch.Tensor, offset_bytes: int) -> torch.Tensor:
    """A contiguous copy of ``t`` whose data starts ``offset_bytes`` past a 16-byte boundary."""
    es = t.element_size()
    assert offset_bytes % es == 0
    buf = torch.empty(t.numel() + 16 // es + offset_bytes // es, dtype=t.dtype, device=t.device)
    base = (-(buf.data_ptr() % 16) % 16) // es  # elements to the next 16-byte boundary
    out = buf[base + offset_bytes // es : base + offset_bytes // es + t.numel()].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 == offset_bytes % 16
    return out


def assert_matmul_close(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None, what: str = ""):
    """``out`` (M, N) against float64 ``x @ w.T + bias``: the output dtype's
    rounding plus an fp32-accumulation allowance relative to sum |x||w|."""
    ref = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    if bias is not None:
        ref = ref + bias.double()
        mag = mag + bias.double().abs()
    eps = EPS[out.dtype]
    tol = eps * ref.abs() + 2e-5 * mag + 1e-7
    err = (out.double() - ref).abs()
    bad = err > tol
    if bool(bad.any()):
        i = int(torch.argmax(err - tol))
        r, c = divmod(i, out.shape[1])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {out.numel()} outputs off; worst at ({r}, {c}): got {out[r, c].item()}, "
            f"want {ref[r, c].item()} (tol {tol[r, c].item():.3g})"
        )


def capture_graph(fn):
    """``fn()`` warmed up once, then captured in a CUDA graph on a side stream:
    returns ``(graph, output)``; ``graph.replay()`` rewrites ``output`` in place."""
    fn()  # warm-up outside the capture (first-use copies and allocations)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        with torch.cuda.graph(graph):
            y = fn()
    torch.cuda.current_stream().wait_stream(s)
    return graph, y


def check_qmatmul_graph_replays(qw, x, bias, kernel: str = "cuda", replays: int = 2) -> None:
    """``pyquant.qmatmul(x, qw, bias)`` captured in a CUDA graph, replayed on new values of
    ``x``: each replay's output equals an eager call's, bit for bit."""
    import pyquant

    graph, y = capture_graph(lambda: pyquant.qmatmul(x, qw, bias, kernel=kernel))
    for _ in range(replays):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, pyquant.qmatmul(x, qw, bias, kernel=kernel), rtol=0, atol=0)


def check_qmatmul(qw, m: int, dtype: torch.dtype, bias_dtype=None, seed: int = 0, x=None, what: str = ""):
    """``pyquant.qmatmul(x, qw, bias, kernel="cuda")`` for a random ``x`` (M, K)
    (or the given one) and bias, checked against the float64 reference; returns the output."""
    n, k = qw.shape
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    if x is None:
        x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    bias = None if bias_dtype is None else torch.randn(n, device="cuda", generator=g).to(bias_dtype)
    out = pyquant.qmatmul(x, qw, bias, kernel="cuda")
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], n)
    w = pyquant.dequantize(qw, torch.float32, kernel="reference")
    assert_matmul_close(out.reshape(-1, n), x.reshape(-1, k), w, bias, what)
    return out
