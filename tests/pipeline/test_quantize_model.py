import copy
import math
import sys

import pytest

from tests.deps import require
import torch
from torch import nn

import pyquant
from pyquant import QuantConfig, quantize_model
from pyquant.errors import DtypeError, FormatError, ShapeError, ValueRangeError
from pyquant.ops.backends.cpu_activations import cpu_activations

from tests.pipeline.models import fast_config as cfg, rel_mse, tiny_llama

transformers = require("transformers")

VOCAB = 256


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (8, 32), generator=g)


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_every_linear_but_the_head_is_replaced(base_model, calib, method):
    model = copy.deepcopy(base_model)
    names = linear_names(model)
    with torch.no_grad():
        ref = model(calib).logits
    report = quantize_model(model, cfg(method, bits=4, group_size=32), calib, progress=False, verbose=False)
    for n in names:
        assert isinstance(model.get_submodule(n), pyquant.QuantLinear), n
    assert type(model.lm_head) is nn.Linear
    assert sorted(r.name for r in report) == sorted(names)
    assert all(r.method == method and r.seconds >= 0 and math.isfinite(r.error) for r in report)
    assert report.n_tokens == (calib.numel() if method != "rtn" else 0)
    with torch.no_grad():
        out = model(calib).logits
    assert rel_mse(out, ref) < 0.05
    assert len(report.to_dicts()) == len(names) and str(report).count("\n") >= len(names)


def test_calibrated_methods_beat_rtn_on_the_calibration_data(base_model, calib):
    errs = {}
    with torch.no_grad():
        ref = base_model(calib).logits
    for method in ("rtn", "gptq", "awq"):
        model = copy.deepcopy(base_model)
        quantize_model(model, cfg(method, bits=3, group_size=32), calib, progress=False, verbose=False)
        with torch.no_grad():
            errs[method] = rel_mse(model(calib).logits, ref)
    assert errs["gptq"] < errs["rtn"], errs
    assert errs["awq"] < errs["rtn"], errs


def test_awq_folding_is_exact_at_8_bits(calib):
    # Wrong folding (norm, v->o with grouped-query attention, up->down) would
    # change the float function; at 8 bits only that would show.
    model = tiny_llama(seed=3, kv_heads=2)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :4] *= 20  # salient channels: AWQ then scales for sure
        ref = model(calib).logits
    report = quantize_model(model, cfg("awq", bits=8, group_size=32), calib, progress=False, verbose=False)
    notes = " ".join(r.note for r in report)
    assert "folded into norm" in notes and "folded into linear" in notes
    with torch.no_grad():
        assert rel_mse(model(calib).logits, ref) < 1e-3


def test_gptq_variants_run(base_model, calib):
    for kw in (dict(act_order=True), dict(act_order="static"), dict(static_groups=True),
               dict(true_sequential=False, clip=None), dict(symmetric=True, group_size=-1), dict(clip="hessian"),
               dict(gptq_refit="scale_zero"), dict(act_order="static", gptq_refit="scale")):
        model = copy.deepcopy(base_model)
        c = cfg("gptq", bits=4, group_size=kw.pop("group_size", 32), **kw)
        quantize_model(model, c, calib, progress=False, verbose=False)
        q = model.model.layers[0].self_attn.q_proj
        assert q.qformat.act_order == (c.act_order is True)  # "static" keeps the plain layout
        with torch.no_grad():
            assert torch.isfinite(model(calib).logits).all()


def test_calibration_data_forms(base_model, calib):
    for data in (calib, list(calib), [calib[:3], calib[3:]], (c for c in calib)):
        model = copy.deepcopy(base_model)
        report = quantize_model(model, cfg("gptq", group_size=32), data, progress=False, verbose=False)
        assert report.n_tokens == calib.numel()


def test_bad_calibration_data(base_model, calib):
    c = cfg("gptq", group_size=32)
    cases = [
        (None, ValueRangeError, "needs calibration_data"),
        (calib.float(), DtypeError, "integer token ids"),
        (calib.view(2, 4, 32), ShapeError, "n_samples, seq_len"),
        (calib + VOCAB, ValueRangeError, "outside the vocabulary"),
        (calib[:1, :8], ShapeError, "too few calibration tokens"),
        ([calib[0], "text"], DtypeError, "tensor of token ids"),
        ("some text", DtypeError, "LongTensor"),
    ]
    for data, exc, msg in cases:
        model = copy.deepcopy(base_model)
        with pytest.raises(exc, match=msg):
            quantize_model(model, c, data, progress=False, verbose=False)
        assert not any(isinstance(m, pyquant.QuantLinear) for m in model.modules())


def test_few_tokens_warn_but_work(base_model):
    model = copy.deepcopy(base_model)
    ids = torch.randint(0, VOCAB, (2, 20))  # 40 tokens < 128 input features of down_proj
    report = quantize_model(model, cfg("gptq", group_size=32), ids, progress=False, verbose=False)
    assert any("rank-deficient" in w for w in report.warnings)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_nan_activations_are_an_error(calib):
    model = tiny_llama(seed=4)
    with torch.no_grad():
        model.model.embed_tokens.weight[int(calib[0, 0])] = float("nan")
    with pytest.raises(ValueRangeError, match="NaN"):
        quantize_model(model, cfg("gptq", group_size=32), calib, progress=False, verbose=False)


def test_filter(base_model, calib):
    model = copy.deepcopy(base_model)
    report = quantize_model(model, cfg("gptq", group_size=32), calib, progress=False, verbose=False,
                            filter=lambda name, m: name.endswith("mlp.down_proj"))
    assert [r.name for r in report] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    with pytest.raises(ValueRangeError, match="matched no nn.Linear"):
        quantize_model(copy.deepcopy(base_model), cfg("gptq"), calib, progress=False, verbose=False,
                       filter=lambda name, m: False)
    with pytest.raises(ValueRangeError, match="matched no nn.Linear"):
        quantize_model(copy.deepcopy(base_model), cfg("rtn"), None, progress=False, verbose=False,
                       filter=lambda name, m: "nothing" in name)


def test_filter_outside_blocks_gets_rtn(base_model, calib):
    model = copy.deepcopy(base_model)
    report = quantize_model(model, cfg("awq", group_size=32), calib, progress=False, verbose=False,
                            filter=lambda name, m: name.endswith("lm_head") or name.endswith("up_proj"))
    head = [r for r in report if r.name == "lm_head"]
    assert head and head[0].method == "rtn" and "outside" in head[0].note
    assert isinstance(model.lm_head, pyquant.QuantLinear)


def test_methods_without_calibration(base_model):
    for method in ("rtn", "q8_0", "q4_0"):
        model = copy.deepcopy(base_model)
        names = linear_names(model)
        report = quantize_model(model, cfg(method), None, progress=False, verbose=False)
        assert [r.name for r in report] == names
    # k-quants need in_features divisible by 256; this model's layers are 64 wide.
    with pytest.raises(ShapeError, match="q_proj.*block size 256"):
        quantize_model(copy.deepcopy(base_model), cfg("q4_k", gguf_fallback=False), None, progress=False,
                       verbose=False)


@pytest.mark.parametrize("method,fallback", [("q4_k", "Q5_0"), ("q5_k", "Q5_1"), ("q6_k", "Q8_0"),
                                             ("q2_k", "Q4_0"), ("q3_k", "Q4_0")])
def test_kquant_falls_back_like_llama_cpp_on_rows_not_a_multiple_of_256(method, fallback):
    model = nn.Sequential(nn.Linear(320, 512), nn.Linear(512, 64))  # 320 % 256 != 0, 512 % 256 == 0
    report = quantize_model(model, cfg(method), None, filter=lambda n, m: True, progress=False, verbose=False)
    first, second = model[0].quantized_weight, model[1].quantized_weight
    assert first.format == pyquant.GGUF(fallback) and second.format == pyquant.GGUF(method.upper())
    assert fallback in report.layers[0].note and report.layers[1].note == ""
    x = torch.randn(3, 320)
    ref = (x @ first.dequantize().T + model[0].bias) @ second.dequantize().T + model[1].bias
    # the dense product of the dequantized weights: the CPU kernels' exact mode (GGUF's default,
    # llama.cpp's int8 activations, differs from it by the rounding of x to 8 bits)
    with cpu_activations("fp32"):
        assert torch.allclose(model(x), ref, atol=1e-4)


def test_hqq_is_called_or_reported_missing(base_model):
    model = copy.deepcopy(base_model)
    names = linear_names(model)
    try:
        import pyquant.algorithms.hqq  # noqa: F401
    except ImportError:
        with pytest.raises(FormatError, match="hqq"):
            quantize_model(model, cfg("hqq", group_size=32), None, progress=False, verbose=False)
        return
    report = quantize_model(model, cfg("hqq", group_size=32), None, progress=False, verbose=False)
    assert [r.name for r in report] == names


def test_config_validation():
    with pytest.raises(FormatError, match="unknown quantization method"):
        QuantConfig("gptx")
    with pytest.raises(FormatError):
        QuantConfig("gptq", bits=5)
    with pytest.raises(ValueRangeError):
        QuantConfig("gptq", damp=-1)
    with pytest.raises(FormatError, match="act_order"):
        QuantConfig("rtn", act_order=True)
    assert QuantConfig("gptq", bits=3, group_size=64, act_order=False).format() == pyquant.Int(3, 64)
    assert QuantConfig("gptq").act_order is True and QuantConfig("awq").act_order is False
    assert QuantConfig("gptq", bits=3, group_size=64, act_order="static").format() == pyquant.Int(3, 64)
    assert "act_order=static" in QuantConfig("gptq", act_order="static").describe()
    with pytest.raises(ValueRangeError, match="act_order"):
        QuantConfig("gptq", act_order="sometimes")
    with pytest.raises(FormatError, match="act_order"):
        QuantConfig("awq", act_order="static")
    assert "refit=scale_zero" in QuantConfig("gptq", gptq_refit="scale_zero").describe()
    with pytest.raises(ValueRangeError, match="gptq_refit"):
        QuantConfig("gptq", gptq_refit="zero")
    assert QuantConfig("q4_0").format() == pyquant.GGUF("Q4_0")
    assert not QuantConfig("rtn").needs_calibration and QuantConfig("awq").needs_calibration
    with pytest.raises(FormatError, match="QuantConfig"):
        quantize_model(nn.Linear(4, 4), dict(method="rtn"))


def test_log_lines_and_plain_progress_without_tqdm(base_model, calib, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    model = copy.deepcopy(base_model)
    quantize_model(model, cfg("gptq", group_size=32), calib, progress=True, verbose=True)
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj" in err and "gptq" in err
    assert "block 2/2" in err


def test_offload_and_device(base_model, calib):
    model = copy.deepcopy(base_model)
    quantize_model(model, cfg("gptq", group_size=32), calib, progress=False, verbose=False,
                   device="cpu", offload=True)
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.slow
def test_smollm2_smoke():
    """The real model: GPTQ 4-bit on a little calibration data keeps perplexity sane."""
    from pyquant.evaluation import calibration_and_eval, perplexity, smollm2_gguf_path

    path = smollm2_gguf_path()
    try:
        from pyquant.integrations.transformers import load_gguf_llama

        model, tok = load_gguf_llama(path)
    except ImportError:
        import os

        d, f = os.path.split(path)
        tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    calib, evals = calibration_and_eval(tok, 8, 2, 256)
    p_float = perplexity(model, evals)
    report = quantize_model(model, cfg("gptq", bits=4, group_size=128), calib, progress=False, verbose=False)
    assert len(report) == 30 * 7
    p_q = perplexity(model, evals)
    assert p_q < 1.5 * p_float, (p_float, p_q)
