"""CPU C++ kernels of the Int format vs the pure-torch reference.

dequantize and unpack must match the reference bit for bit; qmatmul is
compared with an fp64 evaluation of the reference weight, with a tolerance
scaled by the magnitudes involved (the kernels reorder fp32 sums).
Every check runs on both SIMD paths (AVX2+FMA and the scalar fallback).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import pyquant
from pyquant import _ext
from pyquant.errors import DtypeError, FormatError, ShapeError, ValueRangeError
from pyquant.formats import Int
from pyquant.ops import reference
from pyquant.ops._dtypes import dtype_code
from pyquant.ops.backends import cpu_activations as cpu_activations_mod
from pyquant.ops.backends import cpu_int
from pyquant.ops.backends.cpu_activations import cpu_activations
from pyquant.ops.dispatch import select_kernel
from tests.kernels import assert_plan_matches_function, simd_level

C = _ext.load()
pytestmark = pytest.mark.skipif(C is None, reason="compiled extension pyquant._C not built")

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128, 256, -1)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# every level this CPU runs: the float kernels have ymm (avx2, avxvnni) and zmm (avx512) tiles
SIMD = tuple(_ext.simd_levels()) or ("scalar",)


simd = simd_level


def make_qw(bits, group, sym, sdtype, n, k, act_order=False, seed=0):
    """Random codes over the full range, signed scales, non-integer zeros."""
    fmt = Int(bits, group, sym, sdtype, act_order)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.int32)
    ng = fmt.num_groups(k)
    scales = torch.randn(n, ng, generator=g) * 0.02
    zeros = None if sym else torch.rand(n, ng, generator=g) * (1 << bits)
    perm = torch.randperm(k, generator=g).to(torch.int32) if act_order else None
    return fmt.pack(codes, scales, zeros, perm)


def ref_weight(qw) -> torch.Tensor:
    return reference.dequantize_fp32(qw.format, qw.tensor_list(), qw.shape)


def magnitude_weight(qw) -> torch.Tensor:
    """|q| * |s| + |z| * |s| per weight: what the kernels' partial sums scale with."""
    fmt = qw.format
    codes, scales, zeros = fmt.unpack(qw)
    n, k = qw.shape
    gsz = fmt.group_size_for(k)
    s = scales.double().abs().repeat_interleave(gsz, 1)[:, :k]
    z = zeros.double().abs().repeat_interleave(gsz, 1)[:, :k]
    m = (codes.double() + z) * s
    if fmt.act_order:
        out = torch.empty_like(m)
        out[:, qw.tensors["perm"].long()] = m
        m = out
    return m


class Expect:
    """fp64 reference weight and magnitude weight of qw, computed once."""

    def __init__(self, qw):
        self.qw = qw
        self.w64 = ref_weight(qw).double()
        self.mag = magnitude_weight(qw)

    def check(self, y, x, bias=None, rel=2e-5, out_dtype_eps=0.0):
        """|y - y64| <= rel * (|x| @ |W|) + out_dtype_eps * |y64|, reporting the worst ratio."""
        k = self.qw.shape[1]
        x64 = x.double().reshape(-1, k)
        y64 = x64 @ self.w64.T
        if bias is not None:
            y64 = y64 + bias.double()
        bound = rel * (x64.abs() @ self.mag.T) + out_dtype_eps * y64.abs() + 1e-30
        err = (y.double().reshape(y64.shape) - y64).abs()
        ratio = float((err / bound).max()) if err.numel() else 0.0
        assert ratio <= 1.0, (
            f"{self.qw.format.spec()} shape {self.qw.shape} M={y64.shape[0]}: worst error "
            f"{float(err.max()):.3g} is {ratio:.3g}x the bound"
        )


def check_qmatmul(y, x, qw, bias=None, **kw):
    Expect(qw).check(y, x, bias, **kw)


# Every bits x group size x sym/asym x scale dtype combination is checked; the
# six (sym, scale dtype) variants of a (bits, group) pair share one test and
# take turns over the shapes, so each sees ragged K and both SIMD paths.
VARIANTS = list(itertools.product((True, False), SCALE_DTYPES))
DEQUANT_SHAPES = ((3, 576), (2, 100), (1, 33), (2, 1), (5, 256), (1, 37))


# --- dequantize and unpack: bit-exact ------------------------------------------
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
def test_dequantize_unpack_bit_exact(bits, group):
    for v, (sym, sdtype) in enumerate(VARIANTS):
        for n, k in (DEQUANT_SHAPES[v], DEQUANT_SHAPES[(v + 2) % len(DEQUANT_SHAPES)]):
            qw = make_qw(bits, group, sym, sdtype, n, k, seed=n * 1000 + k)
            want = ref_weight(qw)
            want_codes = reference.unpack(qw.tensors["qweight"], qw.format, qw.shape)
            for level in SIMD:
                with simd(level):
                    got = pyquant.dequantize(qw, kernel="cpu")
                    assert got.dtype == torch.float32 and torch.equal(got, want), (
                        f"{qw.format.spec()} {qw.shape} {level}: max diff {float((got - want).abs().max())}"
                    )
                    codes = pyquant.unpack(qw, kernel="cpu")
                    assert torch.equal(codes, want_codes), (qw.format.spec(), qw.shape, level)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_dequantize_half_outputs(dtype):
    qw = make_qw(4, 128, False, torch.float16, 6, 300)
    for level in SIMD:
        with simd(level):
            got = pyquant.dequantize(qw, dtype, kernel="cpu")
            assert got.dtype == dtype and torch.equal(got, pyquant.dequantize(qw, dtype, kernel="reference"))


@pytest.mark.parametrize("bits", BITS)
def test_act_order(bits):
    qw = make_qw(bits, 64, False, torch.float16, 7, 200, act_order=True, seed=bits)
    want = ref_weight(qw)
    expect = Expect(qw)
    x = torch.randn(3, 200)
    for level in SIMD:
        with simd(level):
            assert torch.equal(pyquant.dequantize(qw, kernel="cpu"), want)
            expect.check(pyquant.qmatmul(x, qw, kernel="cpu"), x)


def test_malformed_packed_tensors_raise():
    """The ops can be called without a QuantizedWeight: nothing malformed may
    reach the C++ code."""
    qw = make_qw(4, 32, False, torch.float16, 8, 64)
    q, s, z = qw.tensor_list()
    spec = qw.format.spec()
    for bad in ([q, s], [q, s.float(), z], [q[:4], s, z]):
        with pytest.raises((FormatError, DtypeError, ShapeError)):
            torch.ops.pyquant.qmatmul(torch.randn(2, 64), bad, spec, 8, 64, None, "cpu")
        with pytest.raises((FormatError, DtypeError, ShapeError)):
            torch.ops.pyquant.dequantize(bad, spec, 8, 64, torch.float32, "cpu")
    with pytest.raises(FormatError):
        torch.ops.pyquant.unpack(q[:, :16], spec, 8, 64, "cpu")


def test_act_order_perm_out_of_range():
    qw = make_qw(4, 32, True, torch.float16, 2, 64, act_order=True)
    qw.tensors["perm"][5] = 64
    with pytest.raises(ValueRangeError, match="perm"):
        pyquant.dequantize(qw, kernel="cpu")
    with pytest.raises(ValueRangeError, match="perm"):
        pyquant.qmatmul(torch.randn(1, 64), qw, kernel="cpu")


def test_act_order_perm_changed_in_place_after_the_plan():
    """A launch plan checks perm once; the C++ gather checks it again, so a perm
    changed in place afterwards gives an error naming the entry, not a read
    outside x."""
    qw = make_qw(4, 32, True, torch.float16, 2, 64, act_order=True)
    x = torch.randn(1, 64)
    with torch.no_grad():
        pyquant.qmatmul(x, qw, kernel="cpu")
        qw.tensors["perm"][5] = -3
        with pytest.raises(ValueError, match=r"perm\[5\] = -3 is outside \[0, 63\]"):
            pyquant.qmatmul(x, qw, kernel="cpu")


# --- qmatmul --------------------------------------------------------------------
# N=1 and odd N; ragged K (576 with g128 has a 64-wide last group; 100, 33 and
# 1 end inside a 32-code chunk); M covers the GEMV (1, 2) and GEMM (7, 33) paths.
QMATMUL_CASES = (((1, 576), (1, 7)), ((13, 100), (2, 33)), ((7, 33), (7, 1)), ((3, 1), (33, 2)),
                 ((5, 64), (1, 33)), ((11, 300), (2, 7)))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
def test_qmatmul_all_formats(bits, group):
    for v, (sym, sdtype) in enumerate(VARIANTS):
        (n, k), ms = QMATMUL_CASES[v]
        qw = make_qw(bits, group, sym, sdtype, n, k, seed=7 * n + k)
        expect = Expect(qw)
        for m in ms:
            x = torch.randn(m, k)
            for level in SIMD:
                with simd(level):
                    expect.check(pyquant.qmatmul(x, qw, kernel="cpu"), x)


@pytest.mark.parametrize("sym", (True, False))
def test_qmatmul_short_rows_read_only_their_own_scales(sym):
    """Rows of fewer than eight groups (K = 576 at g128: five) take their scales
    and zeros eight at a time with the lanes past the row masked off: an infinite
    scale in one row leaves its neighbours' outputs exact."""
    qw = make_qw(4, 128, sym, torch.float16, 6, 576, seed=11)
    scales = qw.tensors["scales"]
    scales[2, 0] = float("inf")  # in the lanes row 1 reads past its own
    if not sym:
        qw.tensors["zeros"][4, 0] = float("inf")  # in the lanes row 3 reads past its own
    finite = [0, 1, 3, 4, 5] if sym else [0, 1, 3, 5]
    expect = Expect(qw)
    for m in (1, 2, 5):
        x = torch.randn(m, 576)
        for level in SIMD:
            with simd(level):
                y = pyquant.qmatmul(x, qw, kernel="cpu")
            assert torch.isfinite(y[:, finite]).all(), level
            y64 = x.double() @ expect.w64[finite].T
            bound = 2e-5 * (x.double().abs() @ expect.mag[finite].T)
            assert ((y[:, finite].double() - y64).abs() <= bound).all(), level


@pytest.mark.parametrize("sym", (True, False))
def test_qmatmul_rows_of_x_stay_apart(sym):
    """An Inf in one row of x leaves the other rows' outputs exact. K = 1152 at
    g256 ends in a K block of four groups that starts mid-way through eight, so
    the GEMV's eight-lane read of that block's group sums of x runs into the
    next row's (M = 3 and 4 share one pass)."""
    qw = make_qw(4, 256, sym, torch.float16, 8, 1152, seed=12)
    expect = Expect(qw)
    for m in (2, 3, 4, 5):
        x = torch.randn(m, 1152)
        x[1:, 0] = float("inf")
        for level in SIMD:
            with simd(level):
                y = pyquant.qmatmul(x, qw, kernel="cpu")
            assert torch.isfinite(y[0]).all(), (level, m)
            expect.check(y[:1], x[:1])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", (32, -1))
def test_qmatmul_blocked_shapes(bits, group):
    """Shapes that cross the kernels' internal blocks: K = 4160 spans two or
    more GEMV K blocks for every M (per-channel rows are split across them),
    N = 15 is one full GEMM row tile plus a remainder, M = 5, 9 leave partial
    row blocks of x."""
    qw = make_qw(bits, group, False, torch.bfloat16, 15, 4160, seed=bits)
    expect = Expect(qw)
    for m in (1, 2, 3, 4, 5, 9):
        x = torch.randn(m, 4160)
        for level in SIMD:
            with simd(level):
                expect.check(pyquant.qmatmul(x, qw, kernel="cpu"), x)


@pytest.mark.parametrize("group", (64, 128))
def test_int4_long_rows_in_slices(group):
    """Rows whose x outgrows L1 (K = 8320) go a slice of groups at a time at the
    avx512 level (int4_table.cpp's rows_sliced; 8320 is 65 g128 or 130 g64
    groups, so every M has a short last slice); N = 20 is two blocks of rows.
    fp32 x takes that kernel, bf16 x the AVX512-BF16 one in K blocks."""
    qw = make_qw(4, group, False, torch.float16, 20, 8320, seed=group)
    expect = Expect(qw)
    for m in (1, 2, 3, 5):
        x = torch.randn(m, 8320, generator=torch.Generator().manual_seed(m))
        for level in SIMD:
            with simd(level), cpu_activations("fp32"):
                expect.check(pyquant.qmatmul(x, qw, kernel="cpu"), x)
                xb = x.to(torch.bfloat16)
                expect.check(pyquant.qmatmul(xb, qw, kernel="cpu"), xb.float(), out_dtype_eps=2.0**-8)


@pytest.mark.parametrize("xdtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("lead", ((2, 3), (3, 4)), ids=("M6", "M12"))
def test_qmatmul_dtypes_bias_batch(xdtype, lead):
    """Half-precision x is read by the exact kernels directly (GEMV at M = 6,
    GEMM at M = 12, K = 330 ragged); output in x's dtype, leading dims kept.
    (By default half x takes the int8 kernels: test_cpu_q8.py.)"""
    with cpu_activations("fp32"):
        _check_dtypes_bias_batch(xdtype, lead)


def _check_dtypes_bias_batch(xdtype, lead):
    k = 330
    qw = make_qw(4, 64, False, torch.float16, 24, k)
    x = torch.randn(*lead, k).to(xdtype)
    bias = torch.randn(24).to(xdtype)
    eps = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[xdtype]
    expect = Expect(qw)
    y_ref = pyquant.qmatmul(x, qw, bias, kernel="reference")
    mag = (x.double().abs().reshape(-1, k) @ expect.mag.T).reshape(y_ref.shape)
    for level in SIMD:
        with simd(level):
            y = pyquant.qmatmul(x, qw, bias, kernel="cpu")
            assert y.shape == (*lead, 24) and y.dtype == xdtype
            expect.check(y, x.float(), bias.float(), out_dtype_eps=eps)
            # and against the reference kernel's own output, both rounded to xdtype
            diff = (y.double() - y_ref.double()).abs()
            assert bool((diff <= 2 * eps * y_ref.double().abs() + 4e-5 * mag + 1e-30).all()), float(diff.max())


def test_qmatmul_empty_rows():
    qw = make_qw(4, 32, True, torch.float16, 5, 64)
    y = pyquant.qmatmul(torch.randn(0, 64), qw, torch.randn(5), kernel="cpu")
    assert y.shape == (0, 5)


@pytest.mark.parametrize("threads", (1, 2))
def test_qmatmul_threads(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, m in itertools.product((1, 5, 40), (1, 6)):
            qw = make_qw(4, 64, False, torch.float16, n, 130, seed=n)
            x = torch.randn(m, 130)
            check_qmatmul(pyquant.qmatmul(x, qw, kernel="cpu"), x, qw)
            assert torch.equal(pyquant.dequantize(qw, kernel="cpu"), ref_weight(qw))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", (1, 2))
def test_qmatmul_gemm_super_tiles(threads):
    """N = 200 gives the GEMM super-tiles of several 12-row tiles (and a
    partial last one); K = 1100 spans three 512-column K blocks, ragged."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        qw = make_qw(4, 128, False, torch.float16, 200, 1100, seed=threads)
        expect = Expect(qw)
        x = torch.randn(10, 1100)
        for level in SIMD:
            with simd(level):
                expect.check(pyquant.qmatmul(x, qw, kernel="cpu"), x)
    finally:
        torch.set_num_threads(old)


# Rows of x that reach every panel shape of the outer-product GEMM
# (panel_gemm.h, zmm at the avx512 level, ymm at avx2 and avxvnni): one, two,
# three and four 16-row vectors (16, 17, 33, 49 and 64 rows), and the splits
# 48 + 32 (65), 48 + 48 (96) and 48 + 64 (112), with padding rows; 9 rows
# stay on the dot-product tile (below kOuterTileMinM).
PANEL_MS = (9, 12, 15, 16, 17, 33, 49, 64, 65, 96, 112)


@pytest.mark.parametrize("level", SIMD)
def test_qmatmul_every_panel_width(level):
    """N = 29 leaves a 5-row group in a 12-row tile; K = 600 ends inside a
    second 512-column K block."""
    qw = make_qw(4, 64, False, torch.float16, 29, 600, seed=11)
    expect = Expect(qw)
    bias = torch.randn(29)
    for m in PANEL_MS:
        x = torch.randn(m, 600)
        with cpu_activations("fp32"), simd(level):
            expect.check(pyquant.qmatmul(x, qw, bias, kernel="cpu"), x, bias)


# --- Int4 with bf16 x on AVX512-BF16 (csrc/cpu/int4_bf16.cpp) --------------------------------
BF16_KERNEL = bool(C is not None and C.simd_avx512_bf16())


def int_qmatmul_fp32(x, qw, bias=None, lora=None):
    """The exact C++ entry point's fp32 output (qmatmul rounds it to x's dtype)."""
    n, k = qw.shape
    t = cpu_int._named(qw.format, qw.tensor_list(), qw.shape)
    fmt = qw.format
    y = torch.empty(x.shape[0], n)
    xa, b, scale = lora if lora is not None else (None, None, 0.0)
    p = lambda a: 0 if a is None else a.data_ptr()  # noqa: E731
    C.int_qmatmul(p(x), dtype_code(x.dtype), x.shape[0], p(t["qweight"]), p(t["scales"]), p(t.get("zeros")),
                  p(bias), n, k, fmt.bits, fmt.group_size, dtype_code(fmt.scale_dtype), p(y), 2,
                  p(xa), p(b), 0 if xa is None else xa.shape[1], scale, False)
    return y


@pytest.mark.parametrize("group", GROUPS)
def test_bf16_kernel(group):
    """Every group size, symmetric and not, every scale dtype; ragged K (a
    partial last 64-byte unit, a ragged last group, K = 29 inside one chunk),
    N not a multiple of the 16-row blocks, M across passes of 8 rows and K
    across several x blocks (K = 4160 at M = 8 and 40: 1024-column blocks and
    a partial one); bias and the low-rank epilogue. Against the fp64
    reference at the fp32 kernels' tolerance: the products are exact, the
    sums fp32. Without AVX512-BF16 the same calls check the fp32 kernels."""
    shapes = ((29, 600), (17, 4160), (40, 576), (5, 29), (33, 1000))
    for v, (sym, sdtype) in enumerate(VARIANTS):
        n, k = shapes[v % len(shapes)]
        qw = make_qw(4, group, sym, sdtype, n, k, seed=v)
        expect = Expect(qw)
        bias = torch.randn(n)
        for m in (1, 3, 8, 9, 17, 40, 64):
            assert C.int_bf16_kernel(dtype_code(torch.bfloat16), m, 4) == BF16_KERNEL
            x = torch.randn(m, k).bfloat16()
            expect.check(int_qmatmul_fp32(x, qw, bias), x.float(), bias)
        x = torch.randn(6, k).bfloat16()
        xa, b = torch.randn(6, 4), torch.randn(n, 4)
        y = int_qmatmul_fp32(x, qw, bias, (xa, b, 0.5))
        expect.check(y - 0.5 * (xa @ b.T), x.float(), bias, rel=4e-5)


def test_bf16_kernel_route():
    """Where it runs: 4 bits, bf16 x, up to 64 rows, and only with the
    extension at the avx512 level; auto mode then multiplies bf16 x exactly."""
    bf16, f16 = dtype_code(torch.bfloat16), dtype_code(torch.float16)
    assert C.int_bf16_kernel(bf16, 64, 4) == BF16_KERNEL
    assert not C.int_bf16_kernel(bf16, 65, 4) and not C.int_bf16_kernel(f16, 8, 4)
    assert not any(C.int_bf16_kernel(bf16, 8, bits) for bits in (2, 3, 8))
    assert cpu_activations_mod.use_int8("int", torch.bfloat16, 4, 4) == (not BF16_KERNEL)
    assert cpu_activations_mod.use_int8("int", torch.bfloat16, 4, 3)
    # BF16_KERNEL is about the level in effect (PYQUANT_SIMD may name a lower
    # one); whether the CPU has the extension is asked at the avx512 level.
    cpu_has_bf16 = False
    if "avx512" in SIMD:
        with simd("avx512"):
            cpu_has_bf16 = C.simd_avx512_bf16()
    for level in SIMD:
        with simd(level):
            assert C.int_bf16_kernel(bf16, 8, 4) == (cpu_has_bf16 and level == "avx512")
    if BF16_KERNEL:  # auto is the exact bf16 kernel, bit for bit
        qw = make_qw(4, 128, False, torch.float16, 24, 512)
        x = torch.randn(8, 512).bfloat16()
        y = pyquant.qmatmul(x, qw, kernel="cpu")
        with cpu_activations("fp32"):
            assert torch.equal(y, pyquant.qmatmul(x, qw, kernel="cpu"))


def test_rtn_weights_public_api():
    """The usual path: RTN-quantized weights, default dispatch picks the CPU kernels."""
    w = torch.randn(48, 384)
    for bits, sym in ((4, False), (8, True), (3, False), (2, True)):
        qw = pyquant.quantize_weight(w, Int(bits, 128, sym, torch.float16))
        for op in ("dequantize", "qmatmul", "unpack"):
            assert select_kernel(op, qw.format, torch.device("cpu"), 1).backend == "cpu"
        assert torch.equal(pyquant.dequantize(qw), pyquant.dequantize(qw, kernel="reference"))
        x = torch.randn(5, 384)
        check_qmatmul(pyquant.qmatmul(x, qw), x, qw)


@pytest.mark.parametrize("level", SIMD)
@pytest.mark.parametrize("act_order", (False, True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qmatmul_large_m(act_order, dtype, level):
    """Large M, exact mode, every SIMD level: the vector C++ GEMM (ymm or zmm
    tiles) takes x in blocks of 256 rows
    (bias, act_order's permuted x and bf16's fp32 copy per block; 513 rows end
    with a one-row block); at the scalar level, decoded row panels through
    torch's GEMM (several: panels are at most a quarter of the rows)."""
    qw = make_qw(3, 64, False, torch.bfloat16, 13, 200, act_order=act_order, seed=4)
    expect = Expect(qw)
    x = torch.randn(513, 200).to(dtype)
    bias = torch.randn(13)
    with cpu_activations("fp32"), simd(level):
        y = pyquant.qmatmul(x, qw, bias, kernel="cpu")
    assert y.dtype == dtype
    expect.check(y.float(), x.float(), bias, out_dtype_eps=0.0 if dtype == torch.float32 else 2.0**-8)


@pytest.mark.parametrize("level", SIMD)
def test_large_m_goes_to_torch_gemm_panels_by_level(monkeypatch, level):
    """Exact Int and NF4 products of YMM_PANEL_MIN_M rows or more go to decoded
    panels through torch's GEMM at the avx2 / avxvnni levels (SCALAR_PANEL_MIN_M
    at scalar), never at avx512; below that, the C++ GEMM. Both give the
    product."""
    from pyquant.formats import NF4
    from pyquant.ops.backends import cpu_nf4, cpu_panels

    monkeypatch.setattr(cpu_panels, "SCALAR_PANEL_MIN_M", 40)
    monkeypatch.setattr(cpu_panels, "YMM_PANEL_MIN_M", 40)
    calls = []
    for mod in (cpu_int, cpu_nf4):
        real = mod.panel_matmul
        monkeypatch.setattr(mod, "panel_matmul", lambda *a, real=real, **kw: calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(435)
    w = torch.randn(24, 128, generator=g)
    for fmt in (Int(4, 32, False, torch.float16), NF4(block_size=64)):
        qw = pyquant.quantize_weight(w, fmt)
        wd = pyquant.dequantize(qw, kernel="reference").double()
        for m in (39, 40):
            x = torch.randn(m, 128, generator=g)
            calls.clear()
            with cpu_activations("fp32"), simd(level):
                y = pyquant.qmatmul(x, qw, kernel="cpu")
            assert bool(calls) == (level != "avx512" and m >= 40), (fmt.spec(), level, m, len(calls))
            # fp32 sums of 128 products, relative to the sum of their magnitudes
            # (an absolute bound failed about once in 1200 unseeded draws, on an
            # output near 0; the largest error seen is 2.7e-7 of this magnitude)
            err = (y.double() - x.double() @ wd.T).abs()
            assert bool((err <= 2e-6 * (x.double().abs() @ wd.abs().T)).all()), (fmt.spec(), level, m)


# --- the launch plan (ops/plans.py): the same kernel as the function, its host work done once ---------------
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("mode", ["auto", "int8", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qmatmul_plan_matches_the_kernel_function(act_order, mode, dtype):
    from pyquant.ops.backends import cpu_int

    qw = make_qw(4, 32, False, torch.float16, 24, 96, act_order=act_order, seed=3)
    with cpu_activations(mode):  # the GEMV, the GEMM and (exact mode) the GEMM in two row blocks
        assert_plan_matches_function(cpu_int, qw, (1, 5, 300), dtype, seed=4)
