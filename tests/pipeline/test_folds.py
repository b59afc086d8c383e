"""AWQ's folds: norms are recognised by what they compute, and a fold that
changes the float block's function is undone (or, strict, an error)."""
import copy

import pytest
import torch
from torch import nn

import pyquant
from pyquant.algorithms.awq_fold import NormForm, ScaledInputLinear, fold_into_norm, fold_into_rows, probe_norm
from pyquant.errors import FormatError
from pyquant.pipeline import arch
from pyquant.pipeline.passes.awq import fold_model
from tests.deps import require
from tests.pipeline.models import fast_config, logits, rel_mse, tiny_model, token_ids


def rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class RMSNorm(nn.Module):
    """Named like Llama's, computes ``rms(x) * w**2``: the name must not matter."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return rms(x) * self.weight**2


class Scaler(nn.Module):
    """Gemma's ``rms(x) * (1 + w)`` under another name."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.3)

    def forward(self, x):
        return rms(x) * (1 + self.weight)


class TwoPlus(Scaler):
    def forward(self, x):
        return rms(x) * (2 + self.weight)


def test_probe_finds_what_a_norm_computes():
    d = 16
    cases = [
        (nn.LayerNorm(d), NormForm(0.0, True)),
        (nn.LayerNorm(d, bias=False), NormForm(0.0, False)),
        (nn.RMSNorm(d), NormForm(0.0, False)),
        (Scaler(d), NormForm(1.0, False)),
        (RMSNorm(d), None),
        (TwoPlus(d), None),
        (nn.LayerNorm(d, elementwise_affine=False), None),
        (nn.Linear(d, d), None),
    ]
    for module, form in cases:
        before = {n: p.clone() for n, p in module.named_parameters()}
        assert probe_norm(module, d) == form, type(module).__name__
        assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())  # probed on a copy
    assert probe_norm(nn.LayerNorm(d), 2 * d) is None


def test_probe_on_the_norms_transformers_ships():
    require("transformers")
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    for cls, offset in ((LlamaRMSNorm, 0.0), (Qwen3RMSNorm, 0.0), (Phi3RMSNorm, 0.0), (Gemma2RMSNorm, 1.0),
                        (Gemma3RMSNorm, 1.0)):
        assert probe_norm(cls(32), 32) == NormForm(offset, False), cls.__name__


@pytest.mark.parametrize("norm", [nn.LayerNorm(16), Scaler(16)], ids=["x*w+b", "x*(1+w)"])
def test_fold_into_norm_divides_its_output(norm):
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.add_(torch.randn(16) * 0.1)
    x, s = torch.randn(5, 16), torch.rand(16) + 0.5
    y = norm(x)
    fold_into_norm(norm, s, probe_norm(norm, 16).offset)
    torch.testing.assert_close(norm(x) * s, y)


def test_fold_into_a_row_range():
    torch.manual_seed(1)
    lin, x, s = nn.Linear(8, 12), torch.randn(3, 8), torch.rand(4) + 0.5
    y = lin(x)
    fold_into_rows(lin, s, (4, 8))
    out = lin(x)
    torch.testing.assert_close(out[:, 4:8] * s, y[:, 4:8])
    assert torch.equal(out[:, :4], y[:, :4]) and torch.equal(out[:, 8:], y[:, 8:])


@pytest.fixture(scope="module")
def calib():
    return token_ids(8, seed=1)


def claim_every_norm_is_x_times_w(monkeypatch):
    """The assumption that destroyed Gemma-3 (~2e9 perplexity): every norm computes x * w."""
    monkeypatch.setattr("pyquant.pipeline.folds.probe_norm", lambda norm, width: NormForm(0.0, False))


def test_a_wrong_norm_fold_is_undone_and_reported(monkeypatch, calib):
    claim_every_norm_is_x_times_w(monkeypatch)
    model = tiny_model("gemma3_text")
    ref = logits(model, calib)
    report = fold_model(model, fast_config("awq", bits=4, group_size=32), calib)
    q = next(r for r in report if r.name == "model.layers.0.self_attn.q_proj")
    assert "unscaled: the fold into input_layernorm (Gemma3RMSNorm) changes" in q.note, q.note
    assert any("model.layers.0.self_attn.q_proj: AWQ scale not applied" in w for w in report.warnings)
    assert any("folded into linear" in r.note for r in report)  # the row folds are right and stay
    assert not any("folded into norm" in r.note for r in report)
    assert float((logits(model, calib) - ref).norm() / ref.norm()) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_blocks_keep_right_folds_and_undo_wrong_ones(monkeypatch, calib, dtype):
    # A 16-bit block's own rounding is above 1e-4: the bound follows the dtype, a wrong fold stays far above it.
    report = fold_model(tiny_model("gemma3_text").to(dtype), fast_config("awq", bits=4, group_size=32), calib)
    assert not report.warnings and sum("folded into norm" in r.note for r in report) == 10
    claim_every_norm_is_x_times_w(monkeypatch)
    report = fold_model(tiny_model("gemma3_text").to(dtype), fast_config("awq", bits=4, group_size=32), calib)
    assert sum("unscaled" in r.note for r in report) == 10


def test_strict_folds_raise_naming_the_layer_and_the_norm_class(monkeypatch, calib):
    claim_every_norm_is_x_times_w(monkeypatch)
    model = tiny_model("gemma3_text")
    with pytest.raises(FormatError, match=r"model\.layers\.0\.self_attn\.q_proj.*Gemma3RMSNorm"):
        pyquant.quantize_model(model, fast_config("awq", awq_strict_folds=True), calib, progress=False,
                               verbose=False)


def test_a_norm_of_unknown_form_is_not_folded(calib):
    base = tiny_model("llama")
    odd = RMSNorm(64)
    base.model.layers[0].input_layernorm = odd
    before = {n: p.clone() for n, p in base.named_parameters()}
    with pytest.raises(FormatError, match=r"model\.layers\.0\.self_attn\.q_proj.*RMSNorm.*neither x \* w"):
        pyquant.quantize_model(base, fast_config("awq", awq_strict_folds=True), calib, progress=False,
                               verbose=False)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())  # refused before any change
    model = copy.deepcopy(base)
    report = pyquant.quantize_model(model, fast_config("awq", bits=4, group_size=32), calib, progress=False,
                                    verbose=False)
    notes = {r.name: r.note for r in report}
    assert notes["model.layers.0.self_attn.v_proj"].startswith("unscaled: input_layernorm (RMSNorm) computes neither")
    assert "folded into norm" in notes["model.layers.1.self_attn.v_proj"]
    rtn = copy.deepcopy(base)
    pyquant.quantize_model(rtn, fast_config("rtn", bits=4, group_size=32), None, progress=False, verbose=False)
    ref = logits(base, calib)
    assert rel_mse(logits(model, calib), ref) <= rel_mse(logits(rtn, calib), ref)


def test_a_wrong_adapter_rule_is_caught_by_the_check(monkeypatch, calib):
    # o_proj's scale into k_proj's rows: the same shape as v_proj's, the wrong function.
    rules = list(arch.ADAPTERS["llama"].rules)
    rules[1] = arch.FoldRule(("self_attn.o_proj",), "self_attn.k_proj", heads="self_attn")
    monkeypatch.setitem(arch.ADAPTERS, "llama", arch.Adapter("llama", tuple(rules)))
    model = tiny_model("llama")
    ref = logits(model, calib)
    report = fold_model(model, fast_config("awq", bits=4, group_size=32), calib)
    o = next(r for r in report if r.name == "model.layers.0.self_attn.o_proj")
    assert "unscaled: the fold into self_attn.k_proj (Linear) changes" in o.note, o.note
    assert float((logits(model, calib) - ref).norm() / ref.norm()) <= 1e-4


def test_a_family_without_adapter_folds_only_what_it_verifies(calib):
    base = tiny_model("stablelm")
    before = {n: p.clone() for n, p in base.named_parameters()}
    with pytest.raises(FormatError, match="no fold adapter for model family 'stablelm'"):
        pyquant.quantize_model(base, fast_config("awq", awq_strict_folds=True), calib, progress=False,
                               verbose=False)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    ref = logits(base, calib)
    folded = copy.deepcopy(base)
    notes = {r.name: r.note for r in fold_model(folded, fast_config("awq", bits=4, group_size=32), calib)}
    layer = "model.layers.0."
    assert "folded into norm input_layernorm (x * w + b)" in notes[layer + "self_attn.q_proj"]
    assert "folded into norm post_attention_layernorm (x * w + b)" in notes[layer + "mlp.up_proj"]
    # o_proj and down_proj read no module's output: no guess from their names, an explicit scale.
    assert "explicit input scale" in notes[layer + "self_attn.o_proj"]
    assert "explicit input scale" in notes[layer + "mlp.down_proj"]
    assert float((logits(folded, calib) - ref).norm() / ref.norm()) <= 1e-4
    errs = {}
    for method in ("rtn", "gptq", "awq", "hqq"):  # every method works without an adapter
        model = copy.deepcopy(base)
        pyquant.quantize_model(model, fast_config(method, bits=4, group_size=32), calib, progress=False,
                               verbose=False)
        errs[method] = rel_mse(logits(model, calib), ref)
    assert all(errs[m] <= 1.1 * errs["rtn"] for m in errs), errs


def test_gemma3_without_its_adapter_folds_only_what_it_verifies(monkeypatch, calib):
    """The second benchmark model's family as if pyquant had no adapter for it: strict AWQ refuses it
    by name; otherwise the norms are found by running the block and probed as x * (1 + w), the rest
    gets explicit input scales, and the float function is kept."""
    base = tiny_model("gemma3_text")
    monkeypatch.delitem(arch.ADAPTERS, "gemma3_text")
    with pytest.raises(FormatError, match="no fold adapter for model family 'gemma3_text'"):
        pyquant.quantize_model(copy.deepcopy(base), fast_config("awq", awq_strict_folds=True), calib,
                               progress=False, verbose=False)
    ref = logits(base, calib)
    folded = copy.deepcopy(base)
    notes = {r.name: r.note for r in fold_model(folded, fast_config("awq", bits=4, group_size=32), calib)}
    layer = "model.layers.0."
    assert "folded into norm input_layernorm (x * (1 + w))" in notes[layer + "self_attn.q_proj"]
    assert "folded into norm pre_feedforward_layernorm (x * (1 + w))" in notes[layer + "mlp.up_proj"]
    assert float((logits(folded, calib) - ref).norm() / ref.norm()) <= 1e-4


class ToyBlock(nn.Module):
    """A block no adapter knows: a (1 + w) norm, a linear feeding a linear, an activation."""

    def __init__(self, d):
        super().__init__()
        self.norm = Scaler(d)
        self.up = nn.Linear(d, 2 * d)
        self.mid = nn.Linear(2 * d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x, **kw):
        return x + self.down(torch.nn.functional.gelu(self.mid(self.up(self.norm(x)))))


def test_producers_found_by_running_the_block_are_folded_and_checked(calib):
    model = tiny_model("llama")
    torch.manual_seed(3)
    model.model.layers = nn.ModuleList([ToyBlock(64) for _ in range(2)])
    with torch.no_grad():
        for block in model.model.layers:
            block.up.weight[:4] *= 10
    ref = logits(model, calib)
    notes = {r.name: r.note for r in fold_model(model, fast_config("awq", bits=4, group_size=32), calib)}
    assert "folded into norm norm (x * (1 + w))" in notes["model.layers.0.up"]
    assert "folded into linear up" in notes["model.layers.0.mid"]
    assert "explicit input scale" in notes["model.layers.0.down"]
    assert isinstance(model.model.layers[0].down, ScaledInputLinear)
    assert float((logits(model, calib) - ref).norm() / ref.norm()) <= 1e-4
