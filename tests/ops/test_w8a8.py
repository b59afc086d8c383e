"""W8A8 op on the CPU: the reference spec, the torch.library op and its boundary checks."""
import pytest
import torch

import pyquant
from pyquant.formats import Int
from pyquant.ops import reference, w8a8_matmul


def _qw(n=40, k=70, sdtype=torch.float16, seed=0):
    torch.manual_seed(seed)
    return pyquant.quantize_weight(torch.randn(n, k), Int(8, -1, True, sdtype))


def test_quantize_rows_int8_spec():
    # Scales that are powers of two make every quotient exact, so ties are real ties.
    x = torch.tensor([[254.0, -127.0, 63.5, 0.0], [0.0, 0.0, 0.0, 0.0], [127.0, -63.5, 0.5, 1.5]])
    q, s = reference.quantize_rows_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert s.tolist() == [2.0, 0.0, 1.0]
    assert q[0].tolist() == [127, -64, 32, 0]  # -63.5 rounds half to even -> -64; 31.75 -> 32
    assert q[1].tolist() == [0, 0, 0, 0]
    assert q[2].tolist() == [127, -64, 0, 2]  # -63.5 -> -64, 0.5 -> 0, 1.5 -> 2
    # Half-precision input is upcast exactly first; a non-power-of-two scale is amax / 127 in fp32.
    assert reference.quantize_rows_int8(torch.tensor([[1.0, 0.5]]))[1].item() == torch.tensor(1 / 127).item()
    qh, sh = reference.quantize_rows_int8(x.half())
    assert torch.equal(qh, q) and torch.equal(sh, s)


def test_w8a8_reference_is_exact_integer_arithmetic():
    qw = _qw()
    x = torch.randn(5, 70)
    q, sx = reference.quantize_rows_int8(x)
    codes = pyquant.unpack(qw).to(torch.int64) - 128
    acc = q.to(torch.int64) @ codes.T  # int64 matmul: exact
    want = acc.to(torch.float32) * sx[:, None] * qw.tensors["scales"].float().reshape(1, -1)
    assert torch.equal(w8a8_matmul(x, qw), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_w8a8_close_to_float_matmul(dtype):
    qw = _qw(64, 256)
    x = torch.randn(3, 4, 256).to(dtype)
    bias = torch.randn(64).to(dtype)
    y = w8a8_matmul(x, qw, bias)
    assert y.shape == (3, 4, 64) and y.dtype == dtype
    ref = x.float() @ qw.dequantize().T + bias.float()
    assert float((y.float() - ref).norm() / ref.norm()) < 0.02


def test_w8a8_opcheck():
    qw = _qw()
    n, k = qw.shape
    args = (torch.randn(3, k), qw.tensor_list(), qw.format.spec(), n, k, torch.randn(n), "auto")
    torch.library.opcheck(torch.ops.pyquant.w8a8_matmul.default, args)
    args = (torch.randn(2, 3, k).half(), qw.tensor_list(), qw.format.spec(), n, k, None, "reference")
    torch.library.opcheck(torch.ops.pyquant.w8a8_matmul.default, args)


def test_w8a8_compiles_fullgraph():
    qw = _qw()
    f = torch.compile(lambda x: w8a8_matmul(x, qw) * 2, fullgraph=True)
    x = torch.randn(4, 70)
    assert torch.equal(f(x), w8a8_matmul(x, qw) * 2)


def test_w8a8_empty_batch():
    qw = _qw()
    assert w8a8_matmul(torch.empty(0, 70), qw).shape == (0, 40)


@pytest.mark.parametrize(
    "fmt", [Int(8, 128, True), Int(8, -1, False), Int(4, -1, True), Int(8, -1, True, act_order=True)],
    ids=lambda f: f.spec(),
)
def test_w8a8_rejects_other_formats(fmt):
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    if fmt.act_order:
        qw0 = pyquant.quantize_weight(w, Int(8, -1, True))
        qw = pyquant.QuantizedWeight(fmt, {**qw0.tensors, "perm": torch.arange(64, dtype=torch.int32)}, qw0.shape)
    else:
        qw = pyquant.quantize_weight(w, fmt)
    with pytest.raises(pyquant.FormatError, match="w8a8_matmul needs"):
        w8a8_matmul(torch.randn(2, 64), qw)


def test_w8a8_bad_inputs():
    qw = _qw()
    with pytest.raises(pyquant.ShapeError, match="in_features=70"):
        w8a8_matmul(torch.randn(2, 69), qw)
    with pytest.raises(pyquant.DtypeError):
        w8a8_matmul(torch.randn(2, 70).to(torch.float64), qw)
    with pytest.raises(pyquant.ShapeError, match="bias"):
        w8a8_matmul(torch.randn(2, 70), qw, torch.randn(39))
    with pytest.raises(pyquant.FormatError):
        w8a8_matmul(torch.randn(2, 70), "not a weight")
    with pytest.raises(pyquant.KernelUnavailableError):
        w8a8_matmul(torch.randn(2, 70), qw, kernel="cuda")
