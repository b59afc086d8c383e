"""NF4 CPU C++ kernels against the pure-torch reference.

Dequantization is bit-exact; qmatmul is checked against ``x.double() @
W_ref.double().T`` with an fp32 tolerance. Every test runs on both SIMD paths
(scalar and AVX2+FMA) and, for qmatmul, on both kernels (fused GEMV-style and
tiled GEMM) whatever M is.
"""
import pytest
import torch

import pyquant
from pyquant import NF4, _ext
from pyquant.errors import ShapeError
from pyquant.ops.backends import cpu_nf4
from pyquant.ops._dtypes import ptr
from pyquant.ops.dispatch import select_kernel
from pyquant.formats.nf4 import dynamic_map

C = _ext.load()
pytestmark = pytest.mark.skipif(C is None, reason="pyquant._C not built")

# every level this CPU runs: the float kernels have ymm (avx2, avxvnni) and zmm (avx512) tiles
SIMD = list(_ext.simd_levels()) or ["scalar"]
# (N, K, block_size, double_quant): aligned rows, blocks spanning rows
# (K % bs != 0), odd K (rows starting on a low nibble), tiny, K < block_size;
# rows of whole blocks of 32, 64, 128, 256 and 4096 (the M = 1 kernel's
# unrolled block sizes and its general one), whole rows of 32-blocks in an odd
# number of 32-value steps, and K whose x rows take a pass each at avx512, the
# avx512 kernel taking them in slices of K (12800; 8224 with 32-blocks: a
# last slice of one 32-value step, and two chunks of weight rows).
SHAPES = [
    (64, 256, 64, False),
    (37, 129, 32, True),
    (33, 47, 32, False),
    (20, 300, 128, True),
    (5, 3, 64, True),
    (1, 1, 32, False),
    (3, 1000, 256, False),
    (17, 96, 64, True),
    (1, 4096, 4096, True),
    (576, 1536, 1024, True),
    (24, 384, 128, False),
    (40, 160, 32, True),
    (12, 512, 256, False),
    (3, 12800, 64, False),
    (20, 8224, 32, True),
]
IDS = [f"{n}x{k}-b{bs}{'-dq' if dq else ''}" for n, k, bs, dq in SHAPES]


@pytest.fixture(params=SIMD)
def simd(request):
    assert C.set_simd_level(request.param)
    yield C.simd_level()
    C.set_simd_level("best")


def _qw(n, k, bs, dq, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    return pyquant.quantize_weight(w, NF4(bs, dq))


def _raw_qmatmul(x, qw, bias, path):
    """The C++ entry point with an explicit kernel choice (0 fused, 1 tiled)."""
    n, k = qw.shape
    t = qw.tensors
    dmap = dynamic_map()
    if qw.format.double_quant:
        wargs = (ptr(t["qweight"]), 0, ptr(t["absmax_q"]), ptr(t["absmax_scale"]), ptr(t["absmax_offset"]), ptr(dmap))
    else:
        wargs = (ptr(t["qweight"]), ptr(t["absmax"]), 0, 0, 0, 0)
    y = torch.empty(x.shape[0], n)
    C.nf4_qmatmul(ptr(x), x.shape[0], *wargs, n, k, qw.format.block_size, ptr(bias), ptr(y), 2, path)
    return y


def _check_close(y, x, w_ref, bias=None):
    ref = x.double() @ w_ref.double().T
    scale = (x.double().abs() @ w_ref.double().abs().T).clamp(min=1e-30)
    if bias is not None:
        ref = ref + bias.double()
        scale = scale + bias.double().abs()
    # fp32 accumulation of K products: rounding errors grow like
    # eps * sqrt(K) * sum |x * w| (observed worst: under 1 unit of that).
    bound = 16 * 2.0**-24 * max(1, x.shape[1]) ** 0.5
    err = ((y.double() - ref).abs() / scale).max().item()
    assert err < bound, f"worst error {err:.3g} of sum|x*w| (bound {bound:.3g})"


@pytest.mark.parametrize("n,k,bs,dq", SHAPES, ids=IDS)
def test_dequantize_bit_exact(simd, n, k, bs, dq):
    qw = _qw(n, k, bs, dq)
    ref = pyquant.dequantize(qw, torch.float32, kernel="reference")
    out = pyquant.dequantize(qw, torch.float32, kernel="cpu")
    assert torch.equal(out, ref), f"{simd}: {(out != ref).sum().item()} values differ"
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(pyquant.dequantize(qw, dtype, kernel="cpu"), ref.to(dtype))


def test_nested_absmax_decode_is_not_fused(simd):
    # Double-quant absmax = map[q] * scale + offset with two roundings; an FMA
    # would differ in the last bit for some blocks. Many blocks, varied data.
    qw = _qw(512, 512, 32, True, seed=11)
    ref = pyquant.dequantize(qw, kernel="reference")
    assert torch.equal(pyquant.dequantize(qw, kernel="cpu"), ref)


@pytest.mark.parametrize("n,k,bs,dq", SHAPES, ids=IDS)
@pytest.mark.parametrize("path", [0, 1], ids=["fused", "tiled"])
def test_qmatmul_both_kernels(simd, n, k, bs, dq, path):
    qw = _qw(n, k, bs, dq, seed=n + k)
    w_ref = pyquant.dequantize(qw, kernel="reference")
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(n, generator=g)
    # Every fused group width (1..4 rows of x) and tile remainder is reached.
    for m in (1, 2, 3, 4, 5, 9) if n * k < 100_000 else (1, 7):
        x = torch.randn(m, k, generator=g)
        _check_close(_raw_qmatmul(x, qw, None, path), x, w_ref)
        _check_close(_raw_qmatmul(x, qw, bias, path), x, w_ref, bias)


@pytest.mark.parametrize("n,k,bs,dq", SHAPES[:4], ids=IDS[:4])
def test_qmatmul_tiled_in_row_passes(simd, n, k, bs, dq):
    # Large M: the tiled kernel takes x in passes of 256 rows (bias and the
    # low-rank epilogue per pass); 513 rows end with a one-row pass.
    qw = _qw(n, k, bs, dq, seed=2)
    w_ref = pyquant.dequantize(qw, kernel="reference")
    x = torch.randn(513, k)
    bias = torch.randn(n)
    _check_close(cpu_nf4.qmatmul(x, qw.tensor_list(), qw.format, qw.shape, bias), x, w_ref, bias)
    xa, b = torch.randn(513, 5), torch.randn(n, 5)
    y = cpu_nf4.qmatmul(x, qw.tensor_list(), qw.format, qw.shape, bias, lora_xa=xa, lora_b=b, lora_scale=0.5)
    _check_close(y - 0.5 * (xa @ b.T), x, w_ref, bias)


@pytest.mark.parametrize("m", [9, 17, 33, 49, 64, 65, 96, 112])
def test_qmatmul_tiled_every_panel_width(simd, m):
    # The rows of x that reach each panel shape of the outer-product tile
    # (panel_gemm.h, every vector level): 1-4 vectors, and 48 + 32, 48 + 48,
    # 48 + 64 (9 rows: the dot-product tile, below kOuterTileMinM); N = 29
    # ends in a part tile, K = 1100 in a part of the second 1024-column K
    # block (and, at the avx2 level, in a part of an 8-column transpose).
    qw = _qw(29, 1100, 64, True, seed=m)
    w_ref = pyquant.dequantize(qw, kernel="reference")
    x, bias = torch.randn(m, 1100), torch.randn(29)
    _check_close(_raw_qmatmul(x, qw, bias, 1), x, w_ref, bias)


@pytest.mark.parametrize("m", [1, 4, 8, 9, 32, 256])
def test_qmatmul_auto_choice_every_m(simd, m):
    qw = _qw(96, 320, 64, True, seed=m)
    w_ref = pyquant.dequantize(qw, kernel="reference")
    x = torch.randn(m, 320)
    _check_close(pyquant.qmatmul(x, qw, kernel="cpu"), x, w_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_public_api_dtypes_bias_batch_dims(simd, dtype, kernel):
    qw = _qw(48, 200, 32, True, seed=3)
    x = torch.randn(2, 3, 200).to(dtype)
    bias = torch.randn(48).to(dtype)
    y = pyquant.qmatmul(x, qw, bias, kernel=kernel)
    assert y.dtype == dtype and y.shape == (2, 3, 48)
    w_ref = pyquant.dequantize(qw, kernel="reference")
    ref = (x.double() @ w_ref.double().T + bias.double()).to(dtype)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert torch.allclose(y.float(), ref.float(), atol=tol, rtol=tol), float((y.float() - ref.float()).abs().max())
    # Same fp32 math on both backends: identical after rounding to fp16/bf16
    # except where fp32 summation order flips a rounding.
    other = pyquant.qmatmul(x, qw, bias, kernel="reference" if kernel == "cpu" else "cpu")
    assert torch.allclose(y.float(), other.float(), atol=tol, rtol=tol)


def test_qmatmul_m1_vector_and_empty_batch():
    qw = _qw(24, 80, 32, False)
    assert pyquant.qmatmul(torch.randn(80), qw, kernel="cpu").shape == (24,)
    assert pyquant.qmatmul(torch.randn(0, 80), qw, kernel="cpu").shape == (0, 24)


def test_dispatch_picks_cpu_kernel_and_falls_back(monkeypatch):
    fmt = NF4(64, True)
    cpu = torch.device("cpu")
    assert select_kernel("qmatmul", fmt, cpu, 1).name == "cpu_nf4_qmatmul"
    assert select_kernel("dequantize", fmt, cpu, 1).name == "cpu_nf4_dequantize"
    assert not cpu_nf4._supports(pyquant.Int(4, 32), cpu, 1)
    assert not cpu_nf4._supports(fmt, torch.device("meta"), 1)
    monkeypatch.setattr(cpu_nf4._ext, "load", lambda: None)
    assert select_kernel("qmatmul", fmt, cpu, 1).backend == "reference"


def test_kernel_rejects_inconsistent_packed_tensors():
    qw = _qw(8, 64, 64, False)
    bad = [qw.tensors["qweight"][:-1], qw.tensors["absmax"]]
    with pytest.raises(ShapeError):
        cpu_nf4.qmatmul(torch.randn(1, 64), bad, qw.format, qw.shape, None)
    with pytest.raises(ShapeError):
        cpu_nf4.dequantize(bad, qw.format, qw.shape, torch.float32)
    with pytest.raises(ShapeError):
        cpu_nf4.qmatmul(torch.randn(1, 63), qw.tensor_list(), qw.format, qw.shape, None)


def test_opcheck():
    qw = _qw(24, 96, 32, True)
    n, k = qw.shape
    spec = qw.format.spec()
    x = torch.randn(3, k, requires_grad=True)
    bias = torch.randn(n, requires_grad=True)
    torch.library.opcheck(torch.ops.pyquant.qmatmul.default, (x, qw.tensor_list(), spec, n, k, bias, "cpu"))
    torch.library.opcheck(torch.ops.pyquant.dequantize.default, (qw.tensor_list(), spec, n, k, torch.bfloat16, "cpu"))


def test_threads_do_not_change_results():
    qw = _qw(130, 300, 64, True, seed=5)
    x = torch.randn(6, 300)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, d1 = pyquant.qmatmul(x, qw, kernel="cpu"), pyquant.dequantize(qw, kernel="cpu")
        torch.set_num_threads(2)
        y2, d2 = pyquant.qmatmul(x, qw, kernel="cpu"), pyquant.dequantize(qw, kernel="cpu")
    finally:
        torch.set_num_threads(prev)
    # Each output is computed by one thread in a fixed order: bitwise equal.
    assert torch.equal(y1, y2) and torch.equal(d1, d2)


# --- the launch plan (ops/plans.py): the same kernel as the function, its host work done once ---------------
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("k", [128, 100], ids=["whole-blocks", "ragged"])
@pytest.mark.parametrize("mode", ["auto", "int8", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qmatmul_plan_matches_the_kernel_function(double_quant, k, mode, dtype):
    """Fused, tiled and (from YMM_PANEL_MIN_M rows at avx2) panel products; K = 100
    is not a multiple of 32 (the int8 kernels decline) and its blocks span rows
    (the fused kernel's general loop, not the whole-block one)."""
    from pyquant.ops.backends.cpu_activations import cpu_activations
    from tests.kernels import assert_plan_matches_function

    torch.manual_seed(5)
    qw = pyquant.quantize_weight(torch.randn(20, k), NF4(block_size=64, double_quant=double_quant))
    with cpu_activations(mode):
        assert_plan_matches_function(cpu_nf4, qw, (1, 7, 40, 400), dtype, seed=6)
