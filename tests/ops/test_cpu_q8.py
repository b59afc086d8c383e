"""CPU int8-activation ("q8") kernels at every SIMD level this CPU has.

The quantized activations must equal the spec (tests/ops/q8_spec.py, ggml's
quantizers) byte for byte; products must equal the spec's integer dot products
and block scales to fp32 rounding, relative to the sum of the absolute terms
(the kernels only reorder fp32 sums). Shapes cross every unit and tail of the
kernels: 128-element units of the 512-bit kernels, 64-element pairs, single
32-blocks, and rows of x in passes of 4 / 8 (M = 1, 3, 8, 9, 17).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyquant
from pyquant import _ext
from pyquant.errors import DtypeError, ShapeError, ValueRangeError
from pyquant.formats import NF4, Int, QuantizedWeight
from pyquant.formats.gguf import BLOCK_TYPES, GGUF
from pyquant.ops import reference
from pyquant.ops.backends import cpu_activations, cpu_int, cpu_nf4
from pyquant.ops.backends.cpu_activations import cpu_activations as activations
from tests.kernels import assert_plan_matches_function
from tests.ops import q8_spec

C = _ext.load()
pytestmark = pytest.mark.skipif(C is None, reason="compiled extension pyquant._C not built")
LEVELS = _ext.simd_levels() if C is not None else []
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# rounding of the output dtype (relative), on top of the fp32 bound
OUT_EPS = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.fixture(params=LEVELS)
def level(request):
    with _ext.cpu_simd(request.param):
        yield request.param


def check(y, want, mag, what, rel=2e-6, out_eps=0.0):
    err = (y.double() - want).abs()
    bound = rel * mag + out_eps * want.abs() + 1e-30
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: worst error {float(err.max()):.3g} is {worst:.3g}x the bound"


# ---- quantizers --------------------------------------------------------------------

def _quantize(kind, x, span=1):
    m, k = x.shape
    blk = 256 if kind == "q8_k" else 32
    kp = -(-k // blk) * blk
    out = {"qs": torch.empty(m, kp, dtype=torch.int8), "d": torch.empty(m, kp // blk),
           "s": torch.empty(m, kp // blk), "isum": torch.empty(m, kp // blk, dtype=torch.int32),
           "bsums": torch.empty(m, kp // 16, dtype=torch.int16), "qs2": torch.empty(m, kp, dtype=torch.int8),
           "isum1": torch.empty(m, kp // blk, dtype=torch.int32)}
    C.q8_quantize(q8_spec.KINDS[kind], x.data_ptr(), DTYPES[x.dtype], m, k, *(out[n].data_ptr() for n in out),
                  span=span)
    return out


@pytest.mark.parametrize("kind", list(q8_spec.KINDS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_quantizers_match_ggml_bit_for_bit(level, kind, dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 700, generator=g) * 3).to(dtype)
    x[0, :256] = 0  # an all-zero block: d = 0, codes 0
    x[1, 7] = -x[1, :256].abs().max() - 1  # the largest magnitude negative: Q8_K's d < 0
    x[2, 3], x[2, 9] = 2.5, -2.5  # a tie in magnitude: the first one sets Q8_K's sign
    x[3, :32] = torch.arange(32) / 31 * 127 / 2  # halfway cases for round-half-even
    got, want = _quantize(kind, x), q8_spec.quantize(x, kind)
    assert torch.equal(got["qs"], want["qs"]), f"{kind} {dtype} {level}: codes differ"
    assert torch.equal(got["d"], want["d"]), f"{kind} {dtype} {level}: scales differ"
    if kind == "q8_k":
        assert torch.equal(got["bsums"], want["bsums"])
    else:
        assert torch.equal(got["isum"], want["isum"])
        if kind != "q8_0":
            assert torch.equal(got["s"], want["s"])
        if kind == "q8x2_32":
            assert torch.equal(got["qs2"], want["qs2"]) and torch.equal(got["isum1"], want["isum1"])


@pytest.mark.parametrize("span", (2, 4, 8))
def test_two_planes_with_a_shared_scale_match_the_spec(level, span):
    """Int at g64 / g128 / g256 quantizes x with one d per group (int_act_span): the
    spans start at the row's start, the last one ragged (K = 700: 22 blocks)."""
    g = torch.Generator().manual_seed(span)
    x = torch.randn(3, 700, generator=g)
    x[0, :32 * span] = 0  # a span of zeros: d = 0
    x[1, 40] = 50.0  # one large value sets every block of its span's d
    x[2, 672:] *= 1e-3  # the ragged last span: its own amax
    got, want = _quantize("q8x2_32", x, span), q8_spec.quantize(x, "q8x2_32", span)
    for name in ("qs", "qs2", "d", "s", "isum", "isum1"):
        assert torch.equal(got[name], want[name]), f"span {span} {level}: {name} differs"
    d = got["d"]
    nb = d.shape[1]
    for b0 in range(0, nb, span):  # the spec itself: one d per span, the span's largest |x| / 127
        xs = x[:, 32 * b0:min(32 * (b0 + span), 700)]
        assert torch.equal(d[:, b0:b0 + span], (xs.abs().amax(1, keepdim=True) / 127).expand(-1, min(span, nb - b0)))


def test_int_act_span_rule_matches_the_kernels():
    for group in (-1, 32, 64, 96, 128, 256, 512):
        assert C.q8_int_act_span(group) == q8_spec.int_act_span(group), group
    with pytest.raises(ValueError, match="1 unless kind is 4 .* got span 2 with kind 0"):
        _quantize("q8_0", torch.randn(1, 64), span=2)
    with pytest.raises(ValueError, match="span must be >= 1.* got span 0"):
        _quantize("q8x2_32", torch.randn(1, 64), span=0)


# ---- GGUF --------------------------------------------------------------------------

F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
              "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def gguf_weight(type_name, n, k, seed):
    """Random codes and sub-block scales; small fp16 scales of both signs."""
    rng = np.random.default_rng(seed)
    bt = BLOCK_TYPES[type_name]
    blocks = rng.integers(0, 256, size=(n * (k // bt.block_size), bt.type_size), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        blocks[:, off:off + 2] = (rng.standard_normal(len(blocks)) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    blocks = torch.from_numpy(blocks.reshape(n, -1))
    return blocks, QuantizedWeight(GGUF(type_name), {"blocks": blocks}, (n, k))


@pytest.mark.parametrize("type_name", list(BLOCK_TYPES))
def test_gguf_matches_llama_cpp_arithmetic(level, type_name):
    bs = BLOCK_TYPES[type_name].block_size
    # legacy: 3 blocks (no 128-element unit: the natural-order kernel), 12 (units of four, x in
    # Halves4 order), 5, 7 and 18 (units, then the last one to three blocks one at a time, x natural
    # there; 18: SmolLM2's K = 576); k-quants: 1 and 3 blocks. N = 37: two full 16-row blocks and a
    # remainder. At the avx512 level passes of 4-8 rows of x (M = 5, 8, 9, 17) take Q4_0's 16-row
    # kernel, its last 1-3 blocks in the same loop.
    legacy = ((3, (1, 9)), (5, (1, 9)), (7, (3, 5)), (12, (3, 5, 8, 17)), (18, (1, 5, 8, 17)))
    for nblk, ms in legacy if bs == 32 else ((1, (1, 9)), (3, (3, 8, 17))):
        k = nblk * bs
        blocks, qw = gguf_weight(type_name, 37, k, seed=nblk)
        for m in ms:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            bias = torch.randn(37)
            y = pyquant.qmatmul(x, qw, bias, kernel="cpu")  # "auto": GGUF takes int8 activations
            want, mag = q8_spec.gguf_product(type_name, blocks, x)
            check(y - bias, want, mag, f"{type_name} k={k} m={m} {level}")


@pytest.mark.parametrize("type_name", [t for t, b in BLOCK_TYPES.items() if b.block_size == 256])
def test_gguf_one_row_over_several_super_blocks(level, type_name):
    """One row of x across 2-5 super-blocks. At the 256-bit levels Q4_K and Q5_K
    take it two blocks at a time, one per 128-bit lane (x in BlockPairs16 order),
    and an odd last block alone; N = 37: two full 16-row blocks and a remainder."""
    for nblk in (2, 3, 4, 5):
        k = nblk * 256
        blocks, qw = gguf_weight(type_name, 37, k, seed=20 + nblk)
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(nblk))
        y = pyquant.qmatmul(x, qw, kernel="cpu")
        check(y, *q8_spec.gguf_product(type_name, blocks, x), f"{type_name} k={k} m=1 {level}")


@pytest.mark.parametrize("type_name", list(BLOCK_TYPES))
def test_gguf_long_rows_in_slices_of_k(level, type_name):
    """K = 11264 (44 units of 256): at the avx512 level a pass of 8 rows of x
    outgrows L1, so the driver runs each block of weight rows a slice of K at a
    time and adds the slices' partial products (q8_driver.cpp; Q4_0's 16-row
    kernel excepted). M = 9: passes of 8 and 1; N = 20: two blocks of weight
    rows, the first slice written and the rest added in each. The other levels
    take whole rows."""
    k = 11264
    blocks, qw = gguf_weight(type_name, 20, k, seed=7)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(9))
    y = pyquant.qmatmul(x, qw, kernel="cpu")
    check(y, *q8_spec.gguf_product(type_name, blocks, x), f"{type_name} k={k} {level}")


@pytest.mark.parametrize("mode", ["auto", "int8", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_qmatmul_plan_matches_the_kernel_function(mode, dtype):
    from pyquant.ops.backends import cpu_gguf

    _, qw = gguf_weight("Q4_1", 24, 256, seed=5)
    with activations(mode):  # M = 600 in exact mode: the fused kernel, then torch's GEMM on panels
        assert_plan_matches_function(cpu_gguf, qw, (1, 5, 600), dtype, seed=6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gguf_half_precision_x_is_read_directly(level, dtype):
    blocks, qw = gguf_weight("Q4_K", 19, 512, seed=1)
    x = torch.randn(5, 512).to(dtype)
    y = pyquant.qmatmul(x, qw, kernel="cpu")
    assert y.dtype == dtype
    want, mag = q8_spec.gguf_product("Q4_K", blocks, x)
    check(y, want, mag, f"Q4_K {dtype}", rel=4e-6, out_eps=OUT_EPS[dtype])


def test_gguf_large_m_stays_on_the_int8_kernels():
    # llama.cpp's arithmetic at every M: no switch to the fp32 panels + GEMM path
    blocks, qw = gguf_weight("Q4_0", 5, 256, seed=3)
    x = torch.randn(600, 256, generator=torch.Generator().manual_seed(3))
    check(pyquant.qmatmul(x, qw, kernel="cpu"), *q8_spec.gguf_product("Q4_0", blocks, x), "Q4_0 M=600")


def test_half_precision_x_takes_the_int8_kernels_by_default():
    """fp16 x (and bf16 x, but for Int4 on a CPU with AVX512-BF16) takes the int8 planes in auto mode
    at decode sizes (4 rows: below every level's exact-from row count for Int4)."""
    qw, c, s, z = int_weight(4, 128, False, torch.float16, 64, 1024, seed=6)
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(6))
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype)
        y = pyquant.qmatmul(xh, qw, kernel="cpu")
        check(y, *q8_spec.int_product(c, s, z, qw.format, xh), f"Int4 {dtype} x, auto", out_eps=OUT_EPS[dtype])
        # (Int4 with bf16 x on AVX512-BF16: auto is that exact kernel, test_cpu_int.py)
        exact = cpu_activations.bf16_dot_kernel(dtype, 4, 4)
        with activations("fp32" if exact else "int8"):
            assert torch.equal(y, pyquant.qmatmul(xh, qw, kernel="cpu")), f"{dtype} x, auto: not the expected kernels"
    # the bound above also admits the exact kernels' result: these inputs tell the two paths apart
    with activations("int8"):
        y8 = pyquant.qmatmul(x.half(), qw, kernel="cpu")
    with activations("fp32"):
        assert not torch.equal(y8, pyquant.qmatmul(x.half(), qw, kernel="cpu"))
    yf = pyquant.qmatmul(x, qw, kernel="cpu")  # fp32 x: the exact kernels
    with activations("fp32"):
        assert torch.equal(yf, pyquant.qmatmul(x, qw, kernel="cpu")), "fp32 x, auto: not the exact kernels"
    w = pyquant.dequantize(qw, kernel="reference").double()
    assert float((yf.double() - x.double() @ w.T).abs().max()) <= 1e-5 * float(yf.abs().max())


def test_gguf_exact_path_one_option_away():
    blocks, qw = gguf_weight("Q6_K", 9, 512, seed=2)
    x = torch.randn(3, 512)
    w = pyquant.dequantize(qw, kernel="reference").double()
    with activations("fp32"):
        y = pyquant.qmatmul(x, qw, kernel="cpu")
    exact = x.double() @ w.T
    assert float((y.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())
    int8 = pyquant.qmatmul(x, qw, kernel="cpu")
    assert not torch.equal(int8, y)  # the default is llama.cpp's arithmetic, not the exact product
    check(int8, *q8_spec.gguf_product("Q6_K", blocks, x), "Q6_K default")


# ---- Int ---------------------------------------------------------------------------

def int_weight(bits, group, sym, sdtype, n, k, seed):
    fmt = Int(bits, group, sym, sdtype)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.int32)
    ng = fmt.num_groups(k)
    scales = torch.randn(n, ng, generator=g) * 0.02
    zeros = None if sym else torch.rand(n, ng, generator=g) * (1 << bits)
    qw = fmt.pack(codes, scales, zeros, None)
    c, s, z = fmt.unpack(qw)
    return qw, c, s, z


# K in chunks of 32: 1, 2, 3, 4, 5, 7, 8, 13 (+ ragged tails): every combination of
# 512-bit four-chunk units, a remaining pair and a single chunk
INT_SHAPES = ((5, 32), (7, 64), (3, 96), (9, 128), (4, 150), (6, 224), (17, 256), (3, 400))
VARIANTS = ((True, torch.float16), (False, torch.bfloat16), (False, torch.float32), (True, torch.bfloat16))


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group", (32, 64, 128, 256, -1))
def test_int_int8_activations(level, bits, group):
    for i, (n, k) in enumerate(INT_SHAPES):
        sym, sdtype = VARIANTS[i % len(VARIANTS)]
        qw, c, s, z = int_weight(bits, group, sym, sdtype, n, k, seed=i)
        for m in ((1, 5, 6) if i % 2 else (2, 3, 9)):  # passes of 4 rows, then 1, 2 or 3
            x = torch.randn(m, k)
            with activations("int8"):
                y = pyquant.qmatmul(x, qw, kernel="cpu")
            want, mag = q8_spec.int_product(c, s, z, qw.format, x)
            check(y, want, mag, f"{qw.format.spec()} k={k} m={m} {level}")


@pytest.mark.parametrize("group", (64, 128, 256))
def test_int4_one_row_of_whole_groups(level, group):
    """Int4 rows of 8 or more whole groups at one row of x: at the 256-bit levels a
    kernel of its own converts 8 groups' scales at once (then the rest one by
    one). K = 1280: 8 groups and a tail of 2 (g128), 20 (g64), 5 (g256: the
    general kernel); K = 2048: 32 / 16 / 8 groups. M = 5 takes it for the last
    row, after a pass of four."""
    for i, k in enumerate((1280, 2048)):
        for j, (sym, sdtype) in enumerate(VARIANTS):
            qw, c, s, z = int_weight(4, group, sym, sdtype, 37, k, seed=10 * i + j)
            for m in (1, 5):
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
                with activations("int8"):
                    y = pyquant.qmatmul(x, qw, kernel="cpu")
                want, mag = q8_spec.int_product(c, s, z, qw.format, x)
                check(y, want, mag, f"{qw.format.spec()} k={k} m={m} {level}")


@pytest.mark.parametrize("bits,group", [(4, 128), (8, 128), (4, 256), (3, 64)])
def test_int_long_rows_in_slices_of_k(level, bits, group):
    """K = 8320: two planes and lane scales of a row of x are 24 KiB, so no two rows
    fit a pass in L1 and the driver takes M = 3 in one pass a slice of K at a
    time (q8_driver.cpp: 2560 values, the last 640; at g256 it ends inside the
    ragged last group), adding the slices' partial products. N = 20: two blocks
    of weight rows. M = 1 takes whole rows."""
    k = 8320
    qw, c, s, z = int_weight(bits, group, bits == 8, torch.float16, 20, k, seed=bits)
    for m in (1, 3):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(bits + m))
        with activations("int8"):
            y = pyquant.qmatmul(x, qw, kernel="cpu")
        check(y, *q8_spec.int_product(c, s, z, qw.format, x), f"{qw.format.spec()} m={m} {level}")


@pytest.mark.parametrize("bits,group", [(4, 64), (4, 128), (4, 256), (4, 32), (4, -1), (8, -1), (3, 64), (8, 128),
                                        (3, 256), (2, 128)])
def test_int8_planes_stay_near_the_reference_op(level, bits, group):
    """The int8 path against pyquant's reference qmatmul on the same weight, with an
    outlier channel in x (the case that made one plane miss the bound): within
    1e-3 relative (Frobenius), where a single int8 plane per 32-block of the same
    x is ~1e-2 off. Guards the span's coarser scale (int_act_span) as well."""
    g = torch.Generator().manual_seed(bits * 1000 + group)
    qw = pyquant.quantize_weight(torch.randn(96, 1024, generator=g) * 0.02, Int(bits, group, False))
    x = torch.randn(18, 1024, generator=g)  # passes of four rows, then one of two
    x[:, 77] *= 200
    ref = pyquant.qmatmul(x, qw, kernel="reference").double()
    with activations("int8"):
        y = pyquant.qmatmul(x, qw, kernel="cpu").double()
    rel = float((y - ref).norm() / ref.norm())
    assert rel <= 1e-3, f"{qw.format.spec()} {level}: int8 planes {rel:.2e} off the reference"
    xb = x.view(18, -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    one = pyquant.qmatmul((torch.round(xb / d) * d).view(18, -1), qw, kernel="reference").double()
    assert float((one - ref).norm() / ref.norm()) > 1e-3  # the bound tells two planes from one


def test_int_act_order_and_half_x(level):
    fmt = Int(4, 64, False, torch.float16, act_order=True)
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (10, 256), generator=g, dtype=torch.int32)
    perm = torch.randperm(256, generator=g).to(torch.int32)
    qw = fmt.pack(codes, torch.randn(10, 4, generator=g) * 0.02, torch.rand(10, 4, generator=g) * 16, perm)
    c, s, z = fmt.unpack(qw)
    x = torch.randn(6, 256, generator=g).to(torch.bfloat16)
    with activations("int8"):
        y = pyquant.qmatmul(x, qw, kernel="cpu")
    want, mag = q8_spec.int_product(c, s, z, fmt, x[:, perm.long()])  # packed column j is column perm[j] of x
    check(y, want, mag, f"act_order {level}", out_eps=OUT_EPS[torch.bfloat16])


# ---- NF4 ---------------------------------------------------------------------------

def _decoded_absmax(qw):
    """Block scales as the decode uses them: the dequantized weight over the codebook value."""
    from pyquant.formats.nf4 import NF4_CODEBOOK

    n, k = qw.shape
    w = pyquant.dequantize(qw, kernel="reference").reshape(-1)
    cb = torch.tensor(NF4_CODEBOOK)[pyquant.unpack(qw, kernel="reference").reshape(-1).long()]
    bs = qw.format.block_size
    out = torch.zeros(-(-n * k // bs))
    for b in range(len(out)):
        seg = slice(b * bs, min((b + 1) * bs, n * k))
        i = int(cb[seg].abs().argmax())
        out[b] = w[seg][i] / cb[seg][i]
    return out


@pytest.mark.parametrize("bs, dq", [(32, False), (64, False), (64, True), (128, False), (256, True)])
def test_nf4_int8_activations(level, bs, dq):
    # K = 96: K % 64 != 0, taken by the portable kernel at every level
    for n, k in ((3, 64), (5, 128), (4, 192), (17, 320), (7, 96)):
        qw = pyquant.quantize_weight(torch.randn(n, k), NF4(bs, dq))
        codes = pyquant.unpack(qw, kernel="reference")
        absmax = _decoded_absmax(qw)
        for m in (1, 5):
            x = torch.randn(m, k)
            with activations("int8"):
                y = pyquant.qmatmul(x, qw, kernel="cpu")
            want, mag = q8_spec.nf4_product(codes, absmax, bs, x)
            check(y, want, mag, f"nf4 b{bs} dq={dq} k={k} m={m} {level}", rel=4e-6)


def test_nf4_k_not_a_multiple_of_32_stays_exact():
    qw = pyquant.quantize_weight(torch.randn(4, 100), NF4(64))
    x = torch.randn(2, 100)
    with activations("int8"):
        y = pyquant.qmatmul(x, qw, kernel="cpu")
    exact = x.double() @ pyquant.dequantize(qw, kernel="reference").double().T
    assert float((y.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())


# ---- the option, threads ------------------------------------------------------------

def test_activation_mode_option(monkeypatch):
    f32, bf16 = torch.float32, torch.bfloat16
    assert cpu_activations.current() == "auto"
    assert cpu_activations.use_int8("gguf", f32) and cpu_activations.use_int8("int", bf16)
    assert not cpu_activations.use_int8("int", f32) and not cpu_activations.use_int8("nf4", f32)
    # many rows of half x: exact where the level's exact kernels are the faster path
    big = cpu_activations.EXACT_FROM_M
    f16 = torch.float16  # (bf16 x with 4-bit weights may take the AVX512-BF16 kernel)
    for level in ("scalar", "avx2", "avxvnni", "avx512"):
        monkeypatch.setattr(cpu_activations, "simd_level", lambda: level)
        assert cpu_activations.use_int8("gguf", f16, 4096)
        for fam, bits in (("int", 2), ("int", 3), ("int", 4), ("int", 8), ("nf4", 0)):
            exact_from = {"avx512": cpu_activations.EXACT_FROM_M_AVX512.get((fam, bits), big),
                          "avx2": cpu_activations.EXACT_FROM_M_AVX2[fam, bits],
                          "avxvnni": cpu_activations.EXACT_FROM_M_AVXVNNI.get((fam, bits))}.get(level)
            if exact_from is None:
                assert cpu_activations.use_int8(fam, f16, 4096, bits), (level, fam, bits)
                continue
            assert not cpu_activations.use_int8(fam, f16, exact_from, bits), (level, fam, bits)
            assert not cpu_activations.use_int8(fam, f16, 4096, bits), (level, fam, bits)
            if exact_from > 1:
                assert cpu_activations.use_int8(fam, f16, exact_from - 1, bits), (level, fam, bits)
    monkeypatch.setattr(cpu_activations, "simd_level", lambda: "avx512")
    assert not cpu_activations.use_int8("nf4", f16, 1)  # NF4's exact kernel is as fast there
    monkeypatch.setenv(cpu_activations.ENV, "int8")
    assert cpu_activations.use_int8("int", bf16, big)
    assert cpu_activations.use_int8("nf4", f32)
    with activations("fp32"):
        assert not cpu_activations.use_int8("gguf", bf16)
    monkeypatch.setenv(cpu_activations.ENV, "int4")
    with pytest.raises(ValueRangeError, match="PYQUANT_CPU_ACTIVATIONS"):
        cpu_activations.current()
    with pytest.raises(ValueRangeError, match="'fast'"):
        with activations("fast"):
            pass


@pytest.mark.parametrize("threads", (1, 2))
def test_threads_and_row_blocks(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        qw, c, s, z = int_weight(4, 128, False, torch.float16, 200, 1024, seed=threads)
        x = torch.randn(11, 1024)
        with activations("int8"):
            y = pyquant.qmatmul(x, qw, kernel="cpu")
        check(y, *q8_spec.int_product(c, s, z, qw.format, x), f"threads={threads}")
    finally:
        torch.set_num_threads(old)


# ---- the low-rank epilogue (QLoRA) ----------------------------------------------------------

def _lora_case(fmt, n=40, k=256, r=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = pyquant.quantize_weight(torch.randn(n, k, generator=g) * 0.1, fmt)
    b = torch.randn(n, r, generator=g)
    return qw, b


@pytest.mark.parametrize("fmt", [Int(4, 128, False), Int(3, 64, True), NF4(64), NF4(64, True)],
                         ids=lambda f: f.spec())
@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_lora_epilogue_matches_torch(fmt, mode):
    kern = cpu_nf4 if isinstance(fmt, NF4) else cpu_int
    qw, b = _lora_case(fmt)
    n, k = qw.shape
    # M = 1, 5 (GEMV / fused), 12 (GEMM / tiled), 300 (NF4's decoded panels + torch GEMM)
    for m in (1, 5, 12, 300):
        x = torch.randn(m, k)
        xa = torch.randn(m, b.shape[1])
        bias = torch.randn(n)
        with activations(mode):
            base = kern.qmatmul(x, qw.tensor_list(), fmt, (n, k), bias)
            got = kern.qmatmul(x, qw.tensor_list(), fmt, (n, k), bias, lora_xa=xa, lora_b=b, lora_scale=0.5)
        want = base.double() + 0.5 * (xa.double() @ b.double().T)
        assert float((got.double() - want).abs().max()) <= 1e-5 * float(want.abs().max()), (fmt.spec(), mode, m)
        with activations(mode):
            none = kern.qmatmul(x, qw.tensor_list(), fmt, (n, k), bias, lora_xa=xa, lora_b=b, lora_scale=0.0)
        assert torch.equal(none, base)


def test_lora_epilogue_bad_input():
    qw, b = _lora_case(Int(4, 128, False))
    n, k = qw.shape
    x, xa = torch.randn(2, k), torch.randn(2, 8)
    args = (x, qw.tensor_list(), qw.format, (n, k), None)
    with pytest.raises(ShapeError, match="both"):
        cpu_int.qmatmul(*args, lora_xa=xa)
    with pytest.raises(ShapeError, match=r"\(3, 8\)"):
        cpu_int.qmatmul(*args, lora_xa=torch.randn(3, 8), lora_b=b, lora_scale=1.0)
    with pytest.raises(ShapeError, match="same r"):
        cpu_int.qmatmul(*args, lora_xa=xa, lora_b=torch.randn(n, 4), lora_scale=1.0)
    with pytest.raises(DtypeError, match="lora_b must be float32"):
        cpu_int.qmatmul(*args, lora_xa=xa, lora_b=b.double(), lora_scale=1.0)
