"""HQQ's block check (QuantConfig.hqq_fallback="block"): each decoder block keeps HQQ's
weights only where the model's calibration loss does not rise over RTN's."""
import copy

import pytest
import torch
from torch import nn

import pyquant
from pyquant import QuantConfig, quantize_model
from pyquant.errors import FormatError, ValueRangeError
from pyquant.pipeline.passes import hqq_checked

from tests.pipeline.models import tiny_llama

VOCAB = 256


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama(layers=3)


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(3))


def quantized(model, calib, **kw):
    m = copy.deepcopy(model)
    report = quantize_model(m, QuantConfig("hqq", bits=3, group_size=32, **kw), calib, progress=False)
    return m, report


def packed_equal(a, b):
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_every_layer_holds_hqq_or_rtn_and_blocks_decide_together(base_model, calib):
    model, report = quantized(base_model, calib)
    fmt = QuantConfig("hqq", bits=3, group_size=32).format()
    by_block = {}
    for rec in report:
        w = base_model.get_submodule(rec.name).weight.detach()
        expect = pyquant.quantize_weight(w, fmt, rec.method)
        got = model.get_submodule(rec.name).quantized_weight
        assert rec.method in ("hqq", "rtn")
        assert packed_equal(got, expect), rec.name
        assert "block check" in rec.note
        by_block.setdefault(rec.name.split(".")[2], set()).add(rec.method)
    assert len(by_block) == 3 and all(len(methods) == 1 for methods in by_block.values())
    assert report.n_tokens == calib.numel()


def test_the_result_is_never_worse_than_rtn_on_the_calibration_text(base_model, calib):
    checked, _ = quantized(base_model, calib)
    rtn = copy.deepcopy(base_model)
    quantize_model(rtn, QuantConfig("rtn", bits=3, group_size=32), progress=False)
    batches = hqq_checked.check_batches([calib], 4096)
    with torch.no_grad():
        assert hqq_checked.calibration_loss(checked, batches) <= hqq_checked.calibration_loss(rtn, batches) + 1e-5


def test_a_block_whose_hqq_weights_raise_the_loss_falls_back_to_rtn(base_model, calib, monkeypatch):
    # the loss is read once with RTN everywhere, then once per block in order: the third reading
    # is block 1's with HQQ's weights, made worse here
    real, calls = hqq_checked.calibration_loss, []

    def loss(model, batches):
        calls.append(1)
        return real(model, batches) + (10.0 if len(calls) == 3 else 0.0)

    monkeypatch.setattr(hqq_checked, "calibration_loss", loss)
    model = copy.deepcopy(base_model)
    report = quantize_model(model, QuantConfig("hqq", bits=3, group_size=32), calib, progress=False)
    assert len(calls) == 4
    assert {r.method for r in report if ".layers.1." in r.name} == {"rtn"}
    fmt = QuantConfig("hqq", bits=3, group_size=32).format()
    w = base_model.model.layers[1].mlp.down_proj.weight.detach()
    assert packed_equal(model.model.layers[1].mlp.down_proj.quantized_weight, pyquant.quantize_weight(w, fmt, "rtn"))


def test_no_fallback_without_calibration_data_or_when_turned_off(base_model, calib):
    for data, kw in ((None, {}), (calib, dict(hqq_fallback=None))):
        _, report = quantized(base_model, data, **kw)
        assert {r.method for r in report} == {"hqq"} and report.n_tokens == 0


def test_an_interrupted_check_leaves_the_float_model_untouched(base_model, calib, monkeypatch):
    model = copy.deepcopy(base_model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    calls = []

    def failing(model, batches):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return 1.0

    monkeypatch.setattr(hqq_checked, "calibration_loss", failing)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, QuantConfig("hqq", bits=3, group_size=32), calib, progress=False)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not any(isinstance(m, pyquant.QuantLinear) for m in model.modules())


def test_the_check_reads_at_most_hqq_check_tokens(base_model, calib):
    # 8 sequences of 32, room for 3: the first, the 3rd and the 6th (spread over the whole set)
    batches = hqq_checked.check_batches([calib[:3], calib[3:]], 100)
    assert torch.equal(torch.cat(batches), calib[[0, 2, 5]])
    assert torch.equal(torch.cat(hqq_checked.check_batches([calib], 4096)), calib)
    _, report = quantized(base_model, calib, hqq_check_tokens=64)
    assert report.n_tokens == 64


def test_a_model_without_next_token_logits_is_told_how_to_skip_the_check(calib):
    model = nn.Sequential(nn.Embedding(VOCAB, 64), nn.Linear(64, 64), nn.Linear(64, 8))
    model.get_input_embeddings = lambda: model[0]
    with pytest.raises(FormatError, match=r"hqq_fallback=None.*|.*\(8, 32\)"):
        quantize_model(model, QuantConfig("hqq", bits=4, group_size=32), calib, progress=False)
    assert all(type(m) is nn.Linear for m in model[1:])
    report = quantize_model(model, QuantConfig("hqq", bits=4, group_size=32, hqq_fallback=None), calib,
                            progress=False)
    assert len(report) == 2


@pytest.mark.parametrize("bad", [dict(hqq_fallback="layer"), dict(hqq_check_tokens=1),
                                 dict(hqq_check_tokens=2.5), dict(hqq_check_tokens=True)])
def test_bad_check_options_are_named(bad):
    (key, value), = bad.items()
    with pytest.raises(ValueRangeError, match=key):
        QuantConfig("hqq", **bad)
