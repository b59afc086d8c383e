"""CUDA NF4 and GGUF dequantization ("cuda_nf4_dequantize", "cuda_gguf_dequantize"):
bit-exact with the pure-torch references, computed on the CPU (the spec that
the CPU tests check against bitsandbytes / gguf-py) and moved to the GPU."""
import pytest
import torch

import pyquant
from pyquant.formats import GGUF, NF4, QuantizedWeight
from pyquant.formats.gguf import BLOCK_TYPES

from tests.gpu._cuda_util import capture_graph, cuda_ext_or_skip, misaligned_copy

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ext_with(fn_name):
    ext = cuda_ext_or_skip()
    assert hasattr(ext, fn_name), f"pyquant._C was built with CUDA but lacks {fn_name}"
    return ext


def _assert_bit_exact(out, ref, what):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    same = (out == ref) | (torch.isnan(out) & torch.isnan(ref))
    if not bool(same.all()):
        bad = (~same).nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int((~same).sum())} values differ; first at {bad}: "
                             f"{out[tuple(bad)].item()} vs {ref[tuple(bad)].item()}")


# --- NF4 -------------------------------------------------------------------------
NF4_SHAPES = [(64, 256, 64), (37, 129, 32), (33, 47, 32), (5, 3, 64), (1, 1, 32), (3, 1000, 256), (576, 1536, 1024),
              (300, 4096, 64)]


def _nf4_random(n, k, bs, dq, seed):
    """Random bytes in every field (all 16 codes, all 256 absmax codes), not only RTN output."""
    fmt = NF4(bs, dq)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (shape, dtype) in fmt.tensor_specs((n, k)).items():
        if dtype == torch.uint8:
            tensors[name] = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        else:
            tensors[name] = (torch.rand(shape, generator=g) * 4 - 1).to(dtype)
    return QuantizedWeight(fmt, tensors, (n, k))


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("shape", NF4_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-b{s[2]}")
def test_cuda_nf4_dequantize_bit_exact(shape, dq):
    _ext_with("nf4_dequant_cuda")
    n, k, bs = shape
    for qw in (_nf4_random(n, k, bs, dq, 0),):
        ref32 = pyquant.dequantize(qw, torch.float32, kernel="reference")
        qg = qw.to("cuda")
        for dtype in DTYPES:
            out = pyquant.dequantize(qg, dtype, kernel="cuda")
            _assert_bit_exact(out.cpu(), ref32.to(dtype), f"NF4 {shape} dq={dq} {dtype}")


def test_cuda_nf4_dequantize_misaligned_qweight():
    # the kernel reads 16-byte chunks: an unaligned view is copied first, same result
    _ext_with("nf4_dequant_cuda")
    qw = _nf4_random(37, 129, 32, True, 1).to("cuda")
    t = dict(qw.tensors, qweight=misaligned_copy(qw.tensors["qweight"], 3))
    out = pyquant.dequantize(QuantizedWeight(qw.format, t, qw.shape), torch.float16, kernel="cuda")
    _assert_bit_exact(out.cpu(), pyquant.dequantize(qw.cpu(), torch.float16, kernel="reference"), "NF4 misaligned")


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
def test_cuda_nf4_dequantize_rtn_weights(dq):
    _ext_with("nf4_dequant_cuda")
    torch.manual_seed(0)
    qw = pyquant.quantize_weight(torch.randn(96, 200), NF4(64, dq))
    ref = pyquant.dequantize(qw, torch.bfloat16, kernel="reference")
    _assert_bit_exact(pyquant.dequantize(qw.to("cuda"), torch.bfloat16, kernel="cuda").cpu(), ref, "NF4 RTN")


def test_cuda_nf4_dequantize_cuda_graph():
    _ext_with("nf4_dequant_cuda")
    qw = _nf4_random(64, 256, 64, True, 1).to("cuda")
    # the warm-up call outside the capture copies the lookup table to the device
    graph, y = capture_graph(lambda: pyquant.dequantize(qw, torch.float16, kernel="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    _assert_bit_exact(y.cpu(), pyquant.dequantize(qw.cpu(), torch.float16, kernel="reference"), "NF4 graph")


# --- GGUF ------------------------------------------------------------------------
def _gguf_random(type_name, n, k, seed):
    """Random block bytes with finite fp16 scale fields (every code and sub-scale value occurs)."""
    from pyquant.formats.gguf_blocks import FP16_FIELDS

    bt = BLOCK_TYPES[type_name]
    g = torch.Generator().manual_seed(seed)
    nb = n * (k // bt.block_size)
    raw = torch.randint(0, 256, (nb, bt.type_size), generator=g, dtype=torch.uint8)
    for off in FP16_FIELDS[type_name]:
        # finite fp16 of moderate size, both signs: exponent field 1..29
        bits = (torch.randint(1, 30, (nb,), generator=g) << 10) | torch.randint(0, 1024, (nb,), generator=g)
        bits = bits | (torch.randint(0, 2, (nb,), generator=g) << 15)
        raw[:, off] = (bits & 0xFF).to(torch.uint8)
        raw[:, off + 1] = (bits >> 8).to(torch.uint8)
    return QuantizedWeight(GGUF(type_name), {"blocks": raw.view(n, -1)}, (n, k))


@pytest.mark.parametrize("type_name", list(BLOCK_TYPES))
def test_cuda_gguf_dequantize_bit_exact(type_name):
    _ext_with("gguf_dequant_cuda")
    bs = BLOCK_TYPES[type_name].block_size
    for n, k in ((3, bs), (17, 4 * bs), (64, 2048 if bs == 256 else 320)):
        qw = _gguf_random(type_name, n, k, seed=n)
        ref32 = pyquant.dequantize(qw, torch.float32, kernel="reference")
        qg = qw.to("cuda")
        for dtype in DTYPES:
            out = pyquant.dequantize(qg, dtype, kernel="cuda")
            _assert_bit_exact(out.cpu(), ref32.to(dtype), f"{type_name} {n}x{k} {dtype}")


def test_cuda_gguf_dequantize_bad_blocks_raise():
    _ext_with("gguf_dequant_cuda")
    qw = _gguf_random("Q4_K", 4, 256, 0).to("cuda")
    short = qw.tensors["blocks"][:, :-1].contiguous()
    with pytest.raises(pyquant.ShapeError):
        torch.ops.pyquant.dequantize([short], "gguf_q4_k", 4, 256, torch.float16, "cuda")
