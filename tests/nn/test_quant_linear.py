"""QuantLinear is a drop-in nn.Linear; replace_linear swaps layers in place."""
import copy
import io

import pytest

from tests.deps import require
import torch
from torch import nn

import pyquant
from pyquant.formats import Int
from pyquant.nn import QuantLinear, replace_linear


class Block(nn.Module):
    def __init__(self, d=96, h=160):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d, bias=False)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, 50, bias=False)

    def forward(self, x):
        return self.lm_head(self.norm(x + self.down(torch.nn.functional.gelu(self.up(x)))))


def _dequantized_twin(model):
    """The float model with each QuantLinear replaced by an nn.Linear holding W_hat."""
    twin = copy.deepcopy(model)
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantized_weight())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, lin)
    return twin


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = Block()
    replace_linear(m, Int(4, 32, False))
    return m


def test_default_filter_keeps_head_and_repr(model):
    assert isinstance(model.up, QuantLinear) and isinstance(model.down, QuantLinear)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    r = repr(model.up)
    assert "int4 group 32 asym" in r and "bits/weight" in r and "in_features=96" in r


def test_outputs_match_dequantized_model(model):
    twin = _dequantized_twin(model)
    x = torch.randn(2, 7, 96)
    with torch.no_grad():
        assert torch.allclose(model(x), twin(x), atol=1e-4)


BF16_ULP = 2.0**-8  # spacing of bf16 values in [1, 2)


def _assert_within_bf16_ulps(y, ref, ulps, what):
    """|y - ref| <= ulps bf16 steps at the largest |ref|: rounding, not a missing term."""
    err = float((y.double() - ref.double()).abs().max())
    tol = ulps * BF16_ULP * float(ref.abs().max())
    assert err <= tol, f"{what}: max |error| {err:.4g} > {tol:.4g} ({ulps} bf16 ulps of max |ref|)"


def test_autocast_bf16(model):
    # nn.Linear's default bias (|b| < 1/sqrt(96)) moves the output after the
    # LayerNorm by about as much as bf16 rounding does: give it a bias that counts.
    with torch.no_grad():
        model.up.bias.copy_(torch.randn(model.up.out_features))
    twin = _dequantized_twin(model)
    x = torch.randn(3, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = model(x), twin(x)
        up, down_in = model.up(x), torch.randn(3, 160)
        down = model.down(down_in)
    assert model.up(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.up(x).dtype == torch.bfloat16
    # Each layer against the math autocast asks for: bf16 activations times the
    # weight (rounded to bf16 as nn.Linear's would be) plus the bias, in fp64.
    for out, mod, inp in ((up, model.up, x), (down, model.down, down_in)):
        assert out.dtype == torch.bfloat16
        ref = inp.bfloat16().double() @ mod.dequantized_weight().bfloat16().double().T
        if mod.bias is not None:
            ref = ref + mod.bias.detach().bfloat16().double()
        _assert_within_bf16_ulps(out, ref, 2, f"QuantLinear ({mod.out_features}, {mod.in_features}) under autocast")
    # The whole block against its dequantized twin under the same autocast.
    _assert_within_bf16_ulps(y, y_ref, 4, "block under autocast vs its dequantized nn.Linear twin")


def test_compile(model):
    x = torch.randn(4, 96)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_half_and_bf16_modules_keep_packed_dtypes(model):
    for dt in (torch.float16, torch.bfloat16):
        m = copy.deepcopy(model).to(dt)
        assert m.up.scales.dtype == torch.float16 and m.up.qweight.dtype == torch.uint8
        assert m.up.bias.dtype == dt
        y = m(torch.randn(2, 96, dtype=dt))
        assert y.dtype == dt


def test_state_dict_roundtrip_and_format_change(model):
    sd = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    # Load into a skeleton built with another format: the checkpoint wins.
    torch.manual_seed(1)
    other = Block()
    replace_linear(other, Int(8, -1, True, torch.float32))
    other.load_state_dict(torch.load(buf))
    assert other.up.qformat == model.up.qformat
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_safetensors_state_dict(model, tmp_path):
    safetensors = require("safetensors.torch")
    path = tmp_path / "m.safetensors"
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.save_file(sd, str(path))
    loaded = safetensors.load_file(str(path))
    torch.manual_seed(5)
    other = Block()
    replace_linear(other, Int(4, 32, False))
    other.load_state_dict(loaded)
    x = torch.randn(2, 96)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_deepcopy_is_independent(model):
    c = copy.deepcopy(model)
    c.up.qweight.zero_()
    assert not torch.equal(c.up.qweight, model.up.qweight)


def test_from_linear_with_ready_weight_and_bias():
    lin = nn.Linear(64, 10)
    qw = pyquant.quantize_weight(lin.weight.detach(), Int(8, 32))
    ql = QuantLinear.from_linear(lin, qw)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.allclose(ql(x), lin(x), atol=2e-2)
    with pytest.raises(pyquant.ShapeError):
        QuantLinear.from_linear(nn.Linear(32, 10), qw)
    with pytest.raises(pyquant.FormatError):
        QuantLinear.from_linear(nn.Conv1d(2, 2, 1), Int(4))


# Formats whose packing from_linear / replace_linear must reproduce byte for byte:
# Int over bits, group sizes (per-channel included), sym/asym and scale dtypes;
# NF4 plain and double-quantized; GGUF legacy and k-quant blocks.
PACKING_FORMATS = [
    Int(2, 32, True),
    Int(3, 64, False),
    Int(4, 128, False, torch.bfloat16),
    Int(4, -1, True),
    Int(8, 32, False),
    Int(8, 256, True, torch.float32),
    pyquant.NF4(64),
    pyquant.NF4(128, double_quant=True),
    pyquant.GGUF("Q4_0"),
    pyquant.GGUF("Q8_0"),
    pyquant.GGUF("Q4_K"),
    pyquant.GGUF("Q6_K"),
]


def _assert_packs_like_quantize_weight(module, linear, fmt, where):
    """``module`` holds exactly ``pyquant.quantize_weight(linear.weight, fmt)`` and linear's bias."""
    expected = pyquant.quantize_weight(linear.weight.detach(), fmt)
    got = module.quantized_weight
    assert got.format == fmt and got.shape == expected.shape, f"{where}: {got.format!r} {got.shape}"
    assert sorted(got.tensors) == sorted(expected.tensors), f"{where}: packed tensors {sorted(got.tensors)}"
    for name, want in expected.tensors.items():
        have = got.tensors[name]
        assert have.dtype == want.dtype and torch.equal(have, want), (
            f"{where}: packed {name!r} differs from quantize_weight(linear.weight, {fmt.spec()}) "
            f"in {int((have != want).sum()) if have.shape == want.shape else 'shape'} entries"
        )
    if linear.bias is None:
        assert module.bias is None, where
    else:
        assert torch.equal(module.bias, linear.bias), f"{where}: bias"


@pytest.mark.parametrize("fmt", PACKING_FORMATS, ids=lambda f: f.spec())
def test_from_linear_packs_exactly_quantize_weight(fmt):
    torch.manual_seed(11)
    lin = nn.Linear(512, 24)
    _assert_packs_like_quantize_weight(QuantLinear.from_linear(lin, fmt), lin, fmt, "from_linear")


@pytest.mark.parametrize("fmt", PACKING_FORMATS, ids=lambda f: f.spec())
def test_replace_linear_packs_each_layer_exactly_quantize_weight(fmt):
    torch.manual_seed(12)
    # Different shapes, nested, with and without bias; every K a whole number of k-quant blocks.
    model = nn.Sequential(
        nn.Linear(256, 512), nn.GELU(), nn.Sequential(nn.Linear(512, 256, bias=False), nn.Linear(256, 40))
    )
    float_model = copy.deepcopy(model)
    replace_linear(model, fmt, filter=lambda name, mod: True)
    linears = {name: mod for name, mod in float_model.named_modules() if isinstance(mod, nn.Linear)}
    assert len(linears) == 3
    for name, lin in linears.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear), name
        _assert_packs_like_quantize_weight(module, lin, fmt, f"replace_linear layer {name!r}")


def test_replace_linear_errors():
    m = Block()
    with pytest.raises(ValueError, match="matched no"):
        replace_linear(m, Int(4), filter=lambda name, mod: False)
    with pytest.raises(pyquant.ShapeError, match="'up'"):
        replace_linear(m, pyquant.GGUF("Q4_K"), filter=lambda name, mod: name == "up")
    with pytest.raises(pyquant.FormatError):
        replace_linear(m, "int4")


@pytest.mark.parametrize("planned", [False, True], ids=["first_call", "after_a_plan"])
def test_forward_rejects_bad_input(model, planned):
    if planned:  # the steady-state path (a launch plan for 2 float32 rows) checks as much
        with torch.no_grad():
            model.up(torch.randn(2, 96))
    with torch.no_grad():
        with pytest.raises(pyquant.ShapeError, match=r"\(2, 97\).*in_features=96"):
            model.up(torch.randn(2, 97))
        with pytest.raises(pyquant.ShapeError, match=r"shape \(\).*in_features=96"):
            model.up(torch.tensor(1.0))
        with pytest.raises(pyquant.DtypeError, match="int32"):
            model.up(torch.ones(2, 96, dtype=torch.int32))
        with pytest.raises(pyquant.DtypeError, match="Tensor"):
            model.up([1.0] * 96)
        with pytest.raises(pyquant.DeviceError, match="meta"):
            model.up(torch.randn(2, 96, device="meta"))


def test_training_grads_flow_to_inputs_not_packed_weights(model):
    x = torch.randn(3, 96, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and model.up.bias.grad is not None
    assert not model.up.qweight.requires_grad
