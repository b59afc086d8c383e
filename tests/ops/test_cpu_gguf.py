"""CPU C++ GGUF kernels (pyquant/ops/cpu_gguf.py over pyquant._C).

dequantize must equal gguf-py's ``gguf.quants.dequantize`` bit for bit (every
block type, both SIMD paths); qmatmul is compared with an fp64 matmul of that
same dequantized weight: here the exact fp32 kernels (``cpu_activations("fp32")``
for every test); the default int8-activation kernels (llama.cpp's arithmetic)
are tested in test_cpu_q8.py.
"""

import numpy as np
import pytest

from tests.deps import require, smollm2_gguf
import torch

import pyquant
from pyquant import _ext
from pyquant.formats import QuantizedWeight
from pyquant.formats.gguf import BLOCK_TYPES, GGUF
from pyquant.ops.backends import cpu_gguf
from pyquant.ops.backends.cpu_activations import cpu_activations
from pyquant.ops.dispatch import select_kernel

gguf = require("gguf")

ALL_TYPES = list(BLOCK_TYPES)
FUSED_TYPES = ["Q4_K", "Q6_K", "Q8_0"]
# Byte offsets of the fp16 fields (d, and m/dmin where present) in each block.
F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}


@pytest.fixture(autouse=True)
def exact_kernels():
    with cpu_activations("fp32"):
        yield


@pytest.fixture(scope="module")
def C():
    mod = _ext.load()
    assert mod is not None, "pyquant._C is not built: run the cmake build first"
    return mod


# every level this CPU runs: the tiled kernels have ymm (avx2, avxvnni) and
# outer-product zmm (avx512) tiles
@pytest.fixture(params=_ext.simd_levels() or ["scalar"])
def simd(request, C):
    assert C.set_simd_level(request.param)
    yield request.param
    C.set_simd_level("best")


def random_blocks(type_name, n, k, seed, scales="bits"):
    """(n, row bytes) uint8 of random codes; fp16 fields finite.

    scales="bits": any finite fp16 bit pattern (zeros of both signs,
    subnormals, up to 65504), for bit-exactness. scales="weights": small
    values of both signs, like a real checkpoint, for matmul accuracy (the
    error bound is relative to the row norm, so wild scales would hide errors
    in the small blocks).
    """
    rng = np.random.default_rng(seed)
    bt = BLOCK_TYPES[type_name]
    nb = n * (k // bt.block_size)
    blocks = rng.integers(0, 256, size=(nb, bt.type_size), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        if scales == "bits":
            h = rng.integers(0, 1 << 16, size=nb).astype(np.uint16)
            h[(h & 0x7C00) == 0x7C00] &= 0xBFFF  # exponent 31 (inf/nan) -> finite
        else:
            h = (rng.normal(0, 1e-2, size=nb)).astype(np.float16).view(np.uint16)
        blocks[:, off:off + 2] = h.view(np.uint8).reshape(nb, 2)
    return blocks.reshape(n, nb // n * bt.type_size)


def gguf_ref(type_name, blocks_np, shape):
    out = gguf.quants.dequantize(blocks_np, gguf.GGMLQuantizationType(BLOCK_TYPES[type_name].ggml_type))
    return np.ascontiguousarray(out.reshape(shape), dtype=np.float32)


def qweight(type_name, blocks_np, shape):
    return QuantizedWeight(GGUF(type_name), {"blocks": torch.from_numpy(blocks_np)}, shape)


def assert_bits_equal(ours: torch.Tensor, ref: np.ndarray, what: str):
    assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape, what
    a = ours.numpy().view(np.uint32)
    b = ref.view(np.uint32)
    bad = np.flatnonzero(a != b)
    assert bad.size == 0, (
        f"{what}: {bad.size} of {a.size} values differ; first at flat index {bad[0]}: "
        f"ours {ours.numpy().ravel()[bad[0]]!r} (0x{a.ravel()[bad[0]]:08x}) vs gguf "
        f"{ref.ravel()[bad[0]]!r} (0x{b.ravel()[bad[0]]:08x})"
    )


# (rows N, blocks per row): N=1, one block, odd N, several hundred blocks.
DEQ_SHAPES = [(1, 1), (1, 3), (5, 1), (7, 5), (33, 12), (3, 300)]


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_dequantize_bitexact_vs_gguf(type_name, simd):
    bs = BLOCK_TYPES[type_name].block_size
    for i, (n, nbk) in enumerate(DEQ_SHAPES):
        shape = (n, nbk * bs)
        blocks = random_blocks(type_name, *shape, seed=i)
        ours = pyquant.dequantize(qweight(type_name, blocks, shape), torch.float32, kernel="cpu")
        assert_bits_equal(ours, gguf_ref(type_name, blocks, shape), f"{type_name} {shape} simd={simd}")


# fp16 patterns: zeros of both signs, smallest/largest subnormals, smallest
# normal, ordinary values of both signs, largest finite magnitudes.
SPECIAL_FP16 = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x83FF, 0x0400, 0x3C00, 0xBC00, 0x3555, 0xC2AB,
                0x7BFF, 0xFBFF]
CODE_BYTES = [0x00, 0xFF, 0xAA, 0x55, 0x0F, 0xF0, 0x80, 0x7F]


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_dequantize_special_scales_and_codes(type_name, simd):
    """Every pairing of special fp16 fields and uniform code bytes, incl. signed zeros."""
    bt = BLOCK_TYPES[type_name]
    rows = []
    fields = F16_FIELDS[type_name]
    for i, h in enumerate(SPECIAL_FP16):
        for code in CODE_BYTES:
            blk = np.full(bt.type_size, code, dtype=np.uint8)
            for j, off in enumerate(fields):  # vary the second field against the first
                v = SPECIAL_FP16[(i + 5 * j) % len(SPECIAL_FP16)]
                blk[off:off + 2] = np.array([v], dtype=np.uint16).view(np.uint8)
            rows.append(blk)
    blocks = np.stack(rows)  # one block per row
    shape = (blocks.shape[0], bt.block_size)
    ours = pyquant.dequantize(qweight(type_name, blocks, shape), torch.float32, kernel="cpu")
    assert_bits_equal(ours, gguf_ref(type_name, blocks, shape), f"{type_name} special simd={simd}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_other_dtypes_are_rounded_fp32(dtype, C):
    blocks = random_blocks("Q5_K", 4, 512, seed=3, scales="weights")
    qw = qweight("Q5_K", blocks, (4, 512))
    out = pyquant.dequantize(qw, dtype, kernel="cpu")
    assert out.dtype == dtype
    assert torch.equal(out, torch.from_numpy(gguf_ref("Q5_K", blocks, (4, 512))).to(dtype))


def test_dequantize_thread_counts_agree(C):
    blocks = random_blocks("Q3_K", 64, 2048, seed=4)
    ref = gguf_ref("Q3_K", blocks, (64, 2048))
    before = torch.get_num_threads()
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            out = pyquant.dequantize(qweight("Q3_K", blocks, (64, 2048)), torch.float32, kernel="cpu")
            assert_bits_equal(out, ref, f"Q3_K threads={nt}")
    finally:
        torch.set_num_threads(before)


def test_cpu_kernel_is_the_default_on_cpu(C):
    for t in ALL_TYPES:
        assert select_kernel("dequantize", GGUF(t), torch.device("cpu")).name == "cpu_gguf_dequantize"
        assert select_kernel("qmatmul", GGUF(t), torch.device("cpu"), 1).name == "cpu_gguf_qmatmul"


def test_unknown_type_code_raises(C):
    with pytest.raises(ValueError, match="unknown GGUF block type"):
        C.gguf_dequantize(99, 0, 0, 1, 1)
    with pytest.raises(ValueError, match="unknown GGUF block type"):
        C.gguf_qmatmul(99, 0, 0, 0, 0, 1, 1, 32, 1)


# ---- qmatmul ---------------------------------------------------------------

# Output rounding of the result dtype (half an ulp, relative) on top of the fp32 error.
OUT_EPS = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def check_qmatmul(type_name, n, k, m, dtype, seed, with_bias=True, what=""):
    blocks = random_blocks(type_name, n, k, seed=seed, scales="weights")
    qw = qweight(type_name, blocks, (n, k))
    w = torch.from_numpy(gguf_ref(type_name, blocks, (n, k))).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    y = pyquant.qmatmul(x, qw, bias, kernel="cpu")
    assert y.dtype == dtype and tuple(y.shape) == (m, n)
    ref = x.double() @ w.T
    if bias is not None:
        ref = ref + bias.double()
    # fp32 accumulation error, relative to the row norms; then the output rounding.
    scale = x.double().norm(dim=1, keepdim=True) * w.norm(dim=1)[None, :] + 1e-30
    err = (y.double() - ref).abs()
    bound = 1e-5 * scale + OUT_EPS[dtype] * ref.abs() + 1e-30
    worst = (err / bound).max().item()
    assert worst <= 1.0, (
        f"{type_name} {what} (m={m}, n={n}, k={k}, {dtype}): worst err/bound {worst:.3g}, "
        f"max abs err {err.max().item():.3g}, max rel-to-norm {(err / scale).max().item():.3g}"
    )


@pytest.mark.parametrize("type_name", ALL_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_qmatmul_vs_fp64(type_name, dtype, simd):
    bs = BLOCK_TYPES[type_name].block_size
    # odd N (not a multiple of any register or thread tile), K of several blocks
    for m in (1, 3, 17):
        check_qmatmul(type_name, 37, 5 * bs, m, dtype, seed=m, what=f"simd={simd}")


@pytest.mark.parametrize("type_name", FUSED_TYPES + ["Q5_0"])
def test_qmatmul_shapes(type_name, simd):
    bs = BLOCK_TYPES[type_name].block_size
    for n, nbk, m in [(1, 1, 1), (1, 1, 5), (2, 1, 1), (13, 1, 2), (5, 2048 // bs + 3, 1), (29, 4096 // bs + 1, 6),
                      (70, 2, 9), (29, 5, 65), (13, 2, 300)]:
        check_qmatmul(type_name, n, nbk * bs, m, torch.float32, seed=n + m, with_bias=(n % 2 == 1),
                      what=f"simd={simd}")


def test_qmatmul_torch_gemm_path(monkeypatch, C):
    """Large M below the avx512 level goes to tiles of dequantized rows + torch GEMM; check it (small M here)."""
    monkeypatch.setattr(cpu_gguf, "TORCH_MATMUL_MIN_M", 2)
    monkeypatch.setattr(cpu_gguf, "outer_product_tiles", lambda: False)  # the avx512 level keeps its tiles
    monkeypatch.setattr(cpu_gguf, "ROW_TILE", 16)
    for t in ("Q4_K", "Q2_K"):
        check_qmatmul(t, 45, 512, 7, torch.float32, seed=1, what="torch path")
        check_qmatmul(t, 45, 512, 5, torch.bfloat16, seed=2, with_bias=False, what="torch path")


def assert_close_to_norm(y, ref, x, w, what):
    """|y - ref| <= 1e-5 * ||x_m|| * ||w_n|| (fp32 accumulation, relative to the row norms)."""
    x2, w2 = x.reshape(-1, x.shape[-1]).double(), w.double()
    scale = x2.norm(dim=1, keepdim=True) * w2.norm(dim=1)[None, :]
    err = (y.reshape(-1, y.shape[-1]).double() - ref.reshape(-1, ref.shape[-1])).abs()
    worst = (err / scale).max().item()
    assert worst <= 1e-5, f"{what}: worst error relative to the row norms {worst:.3g}"


def test_qmatmul_batch_dims_noncontiguous_and_empty(C):
    blocks = random_blocks("Q6_K", 10, 512, seed=5, scales="weights")
    qw = qweight("Q6_K", blocks, (10, 512))
    w = torch.from_numpy(gguf_ref("Q6_K", blocks, (10, 512)))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(512, 2, 3, generator=g).permute(1, 2, 0)  # (2, 3, 512), not contiguous
    y = pyquant.qmatmul(x, qw, kernel="cpu")
    assert y.shape == (2, 3, 10) and y.dtype == torch.float32
    assert_close_to_norm(y, x.double() @ w.double().T, x, w, "batched")
    bias = torch.randn(10, generator=g).to(torch.bfloat16)  # bias dtype differs from x
    y = pyquant.qmatmul(x, qw, bias, kernel="cpu")
    assert_close_to_norm(y, x.double() @ w.double().T + bias.double(), x, w, "batched + bf16 bias")
    empty = pyquant.qmatmul(torch.randn(0, 512), qw, kernel="cpu")
    assert empty.shape == (0, 10)


def test_opcheck_with_cpu_kernel(C):
    blocks = random_blocks("Q4_K", 5, 512, seed=6, scales="weights")
    qw = qweight("Q4_K", blocks, (5, 512))
    spec = qw.format.spec()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 512, generator=g).requires_grad_()  # the backward dequantizes with the same kernel
    bias = torch.randn(5, generator=g).requires_grad_()
    torch.library.opcheck(torch.ops.pyquant.qmatmul.default, (x, qw.tensor_list(), spec, 5, 512, bias, "cpu"))
    torch.library.opcheck(torch.ops.pyquant.dequantize.default,
                          (qw.tensor_list(), spec, 5, 512, torch.bfloat16, "cpu"))


# ---- a real checkpoint -------------------------------------------------------

def test_real_model_every_tensor_bitexact(C):
    path = smollm2_gguf()
    reader = gguf.GGUFReader(path)
    seen = set()
    # One thread: results do not depend on it (test_dequantize_thread_counts_agree),
    # and on the shared 2-core test machine waking a second thread for each of
    # ~200 small tensors costs more than the decode.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_tensors(C, reader, seen)
    finally:
        torch.set_num_threads(before)
    assert seen == {"Q4_1", "Q8_0"}


def _check_tensors(C, reader, seen):
    for t in reader.tensors:
        name = t.tensor_type.name
        if name not in BLOCK_TYPES:
            continue  # F32 norms
        seen.add(name)
        blocks = np.array(t.data)  # (rows, row bytes), a writable copy of the memmap
        shape = (blocks.shape[0], int(t.shape[0]))  # ne[0] is the contiguous dim (K)
        ref = gguf.quants.dequantize(blocks, t.tensor_type).reshape(shape)
        qw = qweight(name, blocks, shape)
        for level in ("best", "scalar"):
            C.set_simd_level(level)
            try:
                ours = pyquant.dequantize(qw, torch.float32, kernel="cpu")
            finally:
                C.set_simd_level("best")
            assert_bits_equal(ours, ref, f"{t.name} ({name}, {shape}) simd={level}")
        if t.name == "blk.0.attn_q.weight":
            x = torch.randn(3, shape[1], generator=torch.Generator().manual_seed(0))
            y = pyquant.qmatmul(x, qw, kernel="cpu")
            w = torch.from_numpy(ref)
            assert_close_to_norm(y, x.double() @ w.double().T, x, w, t.name)


@pytest.mark.parametrize("op", ["dequantize", "qmatmul"])
def test_raw_op_with_short_blocks_is_an_error_not_a_read_past_the_end(op):
    # The torch.library ops take any Tensor[]; the C++ kernel must never see a
    # blocks tensor smaller than the format says.
    fmt = GGUF("Q4_K")
    qw = pyquant.quantize_weight(torch.randn(4, 256), fmt)
    short = [qw.tensors["blocks"][:2]]
    with pytest.raises(pyquant.ShapeError, match="blocks"):
        if op == "dequantize":
            torch.ops.pyquant.dequantize(short, fmt.spec(), 4, 256, torch.float32, "cpu")
        else:
            torch.ops.pyquant.qmatmul(torch.randn(1, 256), short, fmt.spec(), 4, 256, None, "cpu")
