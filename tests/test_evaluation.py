"""Corpora and perplexity helpers used by the benchmarks."""
import pytest
import torch

import pyquant
from pyquant.evaluation import calibration_and_eval, perplexity, pydoc_text, token_segments


class CharTokenizer:
    """One token per character: enough to test the segment bookkeeping."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_calibration_and_eval_are_disjoint():
    tok = CharTokenizer()
    calib, evals = calibration_and_eval(tok, 4, 3, 64)
    assert calib.shape == (4, 64) and evals.shape == (3, 64)
    ids = torch.tensor(tok(pydoc_text())["input_ids"])
    assert torch.equal(calib.flatten(), ids[: 4 * 64])
    assert torch.equal(evals.flatten(), ids[-3 * 64 :])


def test_too_little_text_is_an_error():
    with pytest.raises(pyquant.ShapeError, match="tokens"):
        token_segments(CharTokenizer(), "short", 2, 8, from_end=False)


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            return type("Out", (), {"logits": torch.zeros(*ids.shape, 256)})()

    segs = torch.randint(0, 256, (2, 16))
    assert perplexity(Uniform(), segs) == pytest.approx(256, rel=1e-5)
    with pytest.raises(pyquant.ShapeError):
        perplexity(Uniform(), segs.flatten())
