"""LoRALinear and the model-level QLoRA functions (add_lora, merge_lora,
save_adapters, load_adapters).

The reference everywhere is the same function in float torch: the dequantized
weight in a dense product plus ``scaling * dropout(x) @ A.T @ B.T``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import pyquant
from pyquant import LoRALinear, QuantLinear
from pyquant.errors import DtypeError, FormatError, ShapeError, ValueRangeError
from pyquant.formats import NF4, Int

FORMATS = {"int4_g32": Int(4, 32), "nf4_b64": NF4(64)}


def quant_linear(fmt, n=48, k=64, bias=True, seed=0):
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(k, n, bias=bias), fmt)


def lora_layer(fmt=Int(4, 32), r=4, alpha=8.0, dropout=0.0, seed=0, **kw):
    layer = LoRALinear(quant_linear(fmt, seed=seed), r, alpha, dropout, **kw)
    with torch.no_grad():  # B starts at zero: make the adapter path visible
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return layer


def reference_forward(layer: LoRALinear, x, x_lora=None):
    """The same function in float torch ops (autograd through F.linear)."""
    base = layer.base
    w = base.dequantized_weight()
    y = F.linear(x, w, base.bias)
    lowrank = F.linear(F.linear(x if x_lora is None else x_lora, layer.lora_A), layer.lora_B)
    return y + layer.scaling * lowrank


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before, types):
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class Tiny(nn.Module):
    def __init__(self, fmt=Int(4, 32)):
        super().__init__()
        self.q_proj = nn.Linear(64, 48)
        self.v_proj = nn.Linear(48, 64)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)
        pyquant.replace_linear(self, fmt, filter=lambda name, m: name in ("q_proj", "v_proj"))

    def forward(self, x):
        return self.head(self.norm(self.v_proj(torch.relu(self.q_proj(x)))))


# --- the module -------------------------------------------------------------------------
def test_init_trainable_parameters_and_step_zero_output():
    base = quant_linear(Int(4, 32))
    x = torch.randn(3, 64)
    y0 = base(x)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.lora_A.shape == (4, 64) and layer.lora_B.shape == (48, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert torch.equal(layer(x), y0)  # B = 0: the model is unchanged at step 0
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A", "lora_B"]
    assert all(not b.requires_grad for b in layer.buffers())
    layer(x).sum().backward()
    assert layer.base.bias.grad is None and all(b.grad is None for b in layer.buffers())
    with_bias = LoRALinear(quant_linear(Int(4, 32)), r=2, alpha=2, train_bias=True)
    assert sorted(n for n, p in with_bias.named_parameters() if p.requires_grad) == ["base.bias", "lora_A", "lora_B"]


@pytest.mark.parametrize("rslora, expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling(rslora, expected):
    assert LoRALinear(quant_linear(Int(4, 32)), r=4, alpha=16, use_rslora=rslora).scaling == expected


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_forward_and_gradients_match_float_reference(fmt):
    layer = lora_layer(fmt)
    ref = copy.deepcopy(layer)
    x = torch.randn(2, 5, 64)
    xr = x.clone().requires_grad_()
    x.requires_grad_()
    y = layer(x)
    yr = reference_forward(ref, xr)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    y.backward(gy)
    yr.backward(gy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, ref.lora_A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, ref.lora_B.grad, rtol=1e-4, atol=1e-5)


def test_float_linear_base():
    lin = nn.Linear(64, 32)
    layer = LoRALinear(lin, r=4, alpha=4)
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), lin(x) + (x @ layer.lora_A.T) @ layer.lora_B.T)


def test_dropout_only_in_train_mode():
    layer = lora_layer(dropout=0.5)
    x = torch.randn(4, 64, requires_grad=True)
    layer.eval()
    torch.testing.assert_close(layer(x), reference_forward(layer, x))
    layer.train()
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, reference_forward(layer, x, xd), rtol=1e-5, atol=1e-5)
    # gradients through the dropout mask: compare with the float reference
    gx = torch.autograd.grad(y.sum(), x)[0]
    xr = x.detach().clone().requires_grad_()
    torch.manual_seed(7)
    yr = reference_forward(layer, xr, F.dropout(xr, 0.5, training=True))
    torch.testing.assert_close(gx, torch.autograd.grad(yr.sum(), xr)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    layer = lora_layer(dropout=0.1)
    x = torch.randn(6, 64, requires_grad=True)
    torch.manual_seed(3)
    layer(x).square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    torch.manual_seed(3)
    checkpoint(layer, x, use_reentrant=reentrant).square().sum().backward()
    for got, want in zip((x.grad, layer.lora_A.grad, layer.lora_B.grad), grads):
        torch.testing.assert_close(got, want)


def test_autocast_bf16():
    layer = lora_layer()
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32


def test_torch_compile_of_the_layer():
    layer = lora_layer(dropout=0.0)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 64, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    gx, ga = x.grad.clone(), layer.lora_A.grad.clone()
    x.grad = None
    layer.lora_A.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(ga, layer.lora_A.grad)


@pytest.mark.slow
def test_torch_compile_inductor():
    layer = lora_layer()
    x = torch.randn(5, 64, requires_grad=True)
    y = torch.compile(layer)(x)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    assert layer.lora_A.grad is not None


@pytest.mark.parametrize("bad", [torch.tensor([[1] * 64]), torch.randn(2, 64, dtype=torch.float64)])
def test_input_dtype_the_adapters_cannot_take(bad):
    with pytest.raises(DtypeError, match=str(bad.dtype)):
        lora_layer()(bad)


def test_half_precision_input_computes_in_its_dtype():
    layer = lora_layer()
    x = torch.randn(3, 64)
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(r=0), ValueRangeError, "r=0"),
    (dict(r=49), ValueRangeError, "r=49"),
    (dict(r=2.0), ValueRangeError, "r=2.0"),
    (dict(alpha=0), ValueRangeError, "alpha=0"),
    (dict(alpha=float("nan")), ValueRangeError, "alpha=nan"),
    (dict(dropout=1.0), ValueRangeError, "dropout=1.0"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(r=4, alpha=8.0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        LoRALinear(quant_linear(Int(4, 32)), **args)


def test_not_a_linear_layer():
    with pytest.raises(FormatError, match="LayerNorm"):
        LoRALinear(nn.LayerNorm(8), 2, 2)


# --- training -------------------------------------------------------------------------------
def test_plain_training_loop_lowers_the_loss():
    torch.manual_seed(0)
    model = pyquant.add_lora(Tiny(NF4(32)), r=4, alpha=8)
    x = torch.randn(64, 64)
    target = torch.randint(0, 10, (64,))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    # add_lora freezes everything but the adapters (as peft): the optimizer holds A and B only
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"]


# --- add_lora -------------------------------------------------------------------------------
def test_add_lora_targets():
    every = pyquant.add_lora(Tiny(), r=4, alpha=8)
    assert isinstance(every.q_proj, LoRALinear) and isinstance(every.v_proj, LoRALinear)
    assert isinstance(every.head, nn.Linear)  # None targets QuantLinear layers only
    named = pyquant.add_lora(Tiny(), r=2, alpha=2, target_modules=["q_proj", "head"])
    assert isinstance(named.q_proj, LoRALinear) and isinstance(named.head, LoRALinear)
    assert isinstance(named.v_proj, QuantLinear)
    regex = pyquant.add_lora(Tiny(), r=2, alpha=2, target_modules=r".*_proj")
    assert isinstance(regex.q_proj, LoRALinear) and isinstance(regex.v_proj, LoRALinear)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(r=0), ValueRangeError, "r=0"),
    (dict(r=60), ValueRangeError, "'v_proj'"),  # q_proj takes 48 at most, v_proj too: the first named fails
    (dict(alpha=-1), ValueRangeError, "alpha=-1"),
    (dict(target_modules=["norm"]), FormatError, "LayerNorm"),
    (dict(target_modules=["q_proj", "k_proj"]), FormatError, "'k_proj'"),
    (dict(target_modules="nothing.*"), FormatError, "nothing"),
    (dict(dtype=torch.int8), DtypeError, "int8"),
])
def test_add_lora_bad_input_changes_nothing(kwargs, error, match):
    model = Tiny()
    if kwargs.get("r") == 60:
        kwargs["target_modules"] = ["v_proj", "q_proj"]
    before, types = state(model), [type(m) for m in model.modules()]
    args = dict(r=4, alpha=8)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        pyquant.add_lora(model, **args)
    assert_unchanged(model, before, types)
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen either


def test_add_lora_twice_is_an_error():
    model = pyquant.add_lora(Tiny(), r=2, alpha=2)
    with pytest.raises(FormatError, match="already has LoRA"):
        pyquant.add_lora(model, r=2, alpha=2)
    with pytest.raises(FormatError, match="already has LoRA"):
        pyquant.add_lora(model, r=2, alpha=2, target_modules=["q_proj"])


# --- merge_lora -------------------------------------------------------------------------------
def trained(fmt=Int(4, 32)):
    model = pyquant.add_lora(Tiny(fmt), r=4, alpha=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.05)
    return model


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_merge_lora_requantizes_into_the_same_format(fmt):
    model = trained(fmt)
    x = torch.randn(8, 64)
    exact = copy.deepcopy(model)
    y = model(x)
    pyquant.merge_lora(model)
    assert isinstance(model.q_proj, QuantLinear) and model.q_proj.qformat == fmt
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    pyquant.merge_lora(exact, requantize=False)
    assert type(exact.q_proj) is nn.Linear
    torch.testing.assert_close(exact(x), y, rtol=1e-4, atol=1e-4)  # float merge: the same function
    # requantized: the merged float weight rounded once more, within a quantization step
    w_exact = exact.q_proj.weight
    err = (model.q_proj.dequantized_weight() - w_exact).abs().max()
    assert err <= 0.15 * w_exact.abs().max(), err


def test_merge_lora_bad_input_changes_nothing():
    with pytest.raises(FormatError, match="no LoRA adapters"):
        pyquant.merge_lora(Tiny())
    model = trained()
    before, types = state(model), [type(m) for m in model.modules()]
    with pytest.raises(FormatError, match="calibration"):
        pyquant.merge_lora(model, method="gptq")
    with pytest.raises(FormatError, match="unknown quantization method"):
        pyquant.merge_lora(model, method="nope")
    assert_unchanged(model, before, types)


# --- save / load --------------------------------------------------------------------------------
def test_save_and_load_adapters_round_trip(tmp_path):
    model = trained()
    path = str(tmp_path / "adapters.safetensors")
    pyquant.save_adapters(model, path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == ["q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"]
    fresh = pyquant.add_lora(Tiny(), r=4, alpha=8)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=False)
    x = torch.randn(5, 64)
    assert not torch.equal(fresh(x), model(x))
    pyquant.load_adapters(fresh, path)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("change, error, match", [
    (dict(target_modules=["q_proj"]), FormatError, "unexpected"),
    (dict(target_modules=["q_proj", "v_proj", "head"]), FormatError, r"missing \['head.lora_A'"),
    (dict(r=2), ShapeError, "shape"),
    (dict(alpha=4), ValueRangeError, "alpha"),
])
def test_load_adapters_mismatch_changes_nothing(tmp_path, change, error, match):
    path = str(tmp_path / "adapters.safetensors")
    pyquant.save_adapters(trained(), path)
    args = dict(r=4, alpha=8)
    args.update(change)
    other = pyquant.add_lora(Tiny(), **args)
    before, types = state(other), [type(m) for m in other.modules()]
    with pytest.raises(error, match=match):
        pyquant.load_adapters(other, path)
    assert_unchanged(other, before, types)


def test_save_and_load_need_adapters(tmp_path):
    with pytest.raises(FormatError, match="no LoRA adapters"):
        pyquant.save_adapters(Tiny(), str(tmp_path / "a.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(FormatError, match="bad.safetensors"):
        pyquant.load_adapters(trained(), str(bad))
