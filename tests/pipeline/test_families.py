"""Every decoder family quantize_model claims, on tiny random-weight models:
AWQ's folds keep the float function, and no method is worse than RTN."""
import copy

import pytest
import torch

import pyquant
from pyquant.pipeline.passes.awq import fold_model
from tests.pipeline.models import FAMILIES, fast_config, logits, rel_mse, tiny_model, token_ids

# A method's logit error may exceed RTN's by this factor at most. On these models (4-bit g32,
# held-out tokens) the ratios are 0.15-0.35 for GPTQ, 0.43-0.74 for AWQ and 0.70-1.01 for HQQ
# (HQQ fits the weights, not the outputs).
MARGIN = 1.10
FOLD_TOL = 1e-4


@pytest.fixture(scope="module")
def calib():
    return token_ids(8, seed=1)


@pytest.fixture(scope="module")
def held_out():
    return token_ids(8, seed=2)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_folds_keep_the_float_function(family, calib, held_out):
    model = tiny_model(family)
    assert model.config.model_type == family
    ref = logits(model, held_out)
    before = {n: p.clone() for n, p in model.named_parameters()}
    report = fold_model(model, fast_config("awq", bits=4, group_size=32), calib)
    notes = [r.note for r in report]
    assert not report.warnings and all(n.startswith("alpha=") or n == "scale search kept s=1" for n in notes), notes
    norm_folds = [n for n in notes if "folded into norm" in n]
    assert norm_folds and any("folded into linear" in n for n in notes), notes
    offset = "(1 + w)" if family.startswith("gemma") else "x * w)"
    assert all(offset in n for n in norm_folds), norm_folds
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("norm" in n for n in changed) and any("proj" in n for n in changed)
    assert rel(logits(model, held_out), ref) <= FOLD_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_is_no_worse_than_rtn(family, calib, held_out):
    base = tiny_model(family)
    ref = logits(base, held_out)
    errs, reports = {}, {}
    for method in ("rtn", "gptq", "awq", "hqq"):
        model = copy.deepcopy(base)
        reports[method] = pyquant.quantize_model(model, fast_config(method, bits=4, group_size=32), calib,
                                                 progress=False, verbose=False)
        assert len(reports[method]) == (8 if family == "phi3" else 14)
        errs[method] = rel_mse(logits(model, held_out), ref)
    assert all(errs[m] <= MARGIN * errs["rtn"] for m in errs), errs
    assert not reports["awq"].warnings
