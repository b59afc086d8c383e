"""quantize_model's output: one progress bar and a closing summary by default, per-layer lines with
verbose=True or through the ``pyquant`` logger."""
import logging
import sys

import torch
from torch import nn

import pyquant
from pyquant.formats import Int


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 64))


def _run(monkeypatch, capsys, **kw):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain progress lines: deterministic text
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    report = pyquant.quantize_model(_model(), pyquant.QuantConfig("rtn", bits=4, group_size=32), None, **kw)
    return report, capsys.readouterr().err


def test_default_is_progress_and_one_summary(monkeypatch, capsys):
    report, err = _run(monkeypatch, capsys)
    assert "0.weight" not in err and "rel_err=" not in err  # no per-layer line
    assert err.count("| quantize_model") == 1 and "| layers " in err and "bits/weight" in err
    assert "layer 3/3" in err
    fmt = Int(4, 32, False)
    assert report.packed_bytes == sum(fmt.bits_per_weight(s) * s[0] * s[1] / 8 for s in ((96, 64), (64, 96), (64, 64)))
    assert report.float_bytes == 4 * (96 * 64 * 2 + 64 * 64) and report.n_weights == 96 * 64 * 2 + 64 * 64
    assert abs(report.bits_per_weight - 5.0) < 1e-9  # 4 bits + an fp16 scale and zero per 32 weights


def test_verbose_prints_each_layer(monkeypatch, capsys):
    _, err = _run(monkeypatch, capsys, verbose=True)
    assert sum("rel_err=" in line for line in err.splitlines()) == 3


def test_silent_and_logger(monkeypatch, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="pyquant"):
        _, err = _run(monkeypatch, capsys, progress=False)
    assert err == ""
    assert sum("rel_err=" in r.getMessage() for r in caplog.records) == 3
