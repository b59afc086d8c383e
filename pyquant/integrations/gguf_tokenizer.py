"""The tokenizer of a GGUF file, converted by transformers once and then kept.

``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` rebuilds the tokenizer
from the file's vocabulary on every call, parsing the metadata with gguf-py's
reader: about 10 s for SmolLM2's 49K tokens on two cores, paid by every
command and every evaluation that opens the file. The converted tokenizer is
saved (``save_pretrained``: tokenizer.json and its config) under
``$PYQUANT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/pyquant``, else
``~/.cache/pyquant``), keyed by the file (path, size, modification time) and
the transformers and tokenizers versions, and read back from there (well under
a second). A cache that cannot be written is skipped, never an error.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

__all__ = ["gguf_tokenizer", "tokenizer_cache_dir"]


def tokenizer_cache_dir() -> str:
    root = os.environ.get("PYQUANT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pyquant")
    return os.path.join(root, "gguf-tokenizers")


def _key(path: str) -> str:
    import tokenizers
    import transformers

    st = os.stat(path)
    ident = f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}\0{tokenizers.__version__}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def gguf_tokenizer(path):
    """``AutoTokenizer`` for the GGUF file at ``path`` (local files only)."""
    from transformers import AutoTokenizer

    path = os.path.abspath(os.fspath(path))
    cached = os.path.join(tokenizer_cache_dir(), _key(path))
    if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        try:
            return AutoTokenizer.from_pretrained(cached, local_files_only=True)
        except Exception:  # noqa: BLE001 - a damaged entry (tokenizers' own parse errors are plain
            pass  # Exceptions): convert again and replace it
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              local_files_only=True)
    _store(tokenizer, cached)
    return tokenizer


def _store(tokenizer, cached: str) -> None:
    """Write to a fresh folder beside the entry, then rename it into place, so a
    reader never sees half an entry (two writers: one rename wins)."""
    try:
        parent = os.path.dirname(cached)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    except OSError:
        return
    try:
        tokenizer.save_pretrained(tmp)
        if os.path.isdir(cached):
            shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
    except Exception:  # noqa: BLE001 - the cache is best-effort: the tokenizer in hand is returned
        shutil.rmtree(tmp, ignore_errors=True)
