"""Autotune results persisted per GPU name as JSON.

File: ``$PYQUANT_CACHE_DIR/triton/<gpu-name>.json`` (default
``~/.cache/pyquant/triton/<gpu-name>.json``)::

    {"version": 1, "device": "NVIDIA H100 80GB HBM3",
     "entries": {"<path>|<format spec>|<x dtype>|<N>x<K>|m<bucket>": {"BN": 64, ...}}}

The file is read lazily, at the first lookup (never at import). A file that
cannot be parsed, or entries that are not valid configs, are ignored with a
warning: a broken cache costs tuning, never a crash. ``save()`` re-reads the
file and merges (entries found on disk that this process did not tune are
kept, this process's entries win), then replaces it atomically, so concurrent
processes tuning different shapes do not erase each other's results.
No triton import here.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Dict, Optional

from .configs import Config

VERSION = 1


def cache_dir() -> Path:
    root = os.environ.get("PYQUANT_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "pyquant"
    return base / "triton"


def safe_name(device_name: str) -> str:
    """A GPU name as a file name: ``NVIDIA H100 80GB HBM3`` -> ``NVIDIA_H100_80GB_HBM3``."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", device_name.strip()).strip("_")
    return s or "unknown"


def cache_path(device_name: str) -> Path:
    return cache_dir() / f"{safe_name(device_name)}.json"


def _read(path: Path) -> Dict[str, Config]:
    """Entries of one cache file; {} (with a warning) when missing parts are bad."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        warnings.warn(f"pyquant: cannot read Triton tuning cache {path}: {exc}; ignoring it", stacklevel=3)
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise ValueError("expected an object with an 'entries' object")
        if data.get("version") != VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        warnings.warn(f"pyquant: corrupt Triton tuning cache {path} ({exc}); ignoring it", stacklevel=3)
        return {}
    out: Dict[str, Config] = {}
    bad = []
    for key, cfg in data["entries"].items():
        try:
            out[str(key)] = Config.from_dict(cfg)
        except (TypeError, ValueError):
            bad.append(key)
    if bad:
        warnings.warn(
            f"pyquant: ignoring {len(bad)} malformed entries of Triton tuning cache {path} (e.g. {bad[0]!r})",
            stacklevel=3,
        )
    return out


class TuningCache:
    """Configs of one GPU name: lazy load, lookup, record, merge-on-save."""

    def __init__(self, device_name: str, path: Optional[Path] = None):
        self.device_name = device_name
        self.path = Path(path) if path is not None else cache_path(device_name)
        self._entries: Optional[Dict[str, Config]] = None
        self._dirty: Dict[str, Config] = {}
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._entries is not None

    def _ensure(self) -> Dict[str, Config]:
        if self._entries is None:
            with self._lock:
                if self._entries is None:
                    self._entries = _read(self.path)
        return self._entries

    def get(self, key: str) -> Optional[Config]:
        return self._ensure().get(key)

    def put(self, key: str, cfg: Config) -> None:
        entries = self._ensure()
        with self._lock:
            entries[key] = cfg
            self._dirty[key] = cfg

    def entries(self) -> Dict[str, Config]:
        return dict(self._ensure())

    def save(self) -> Path:
        """Merge this process's new entries into the file and write it atomically."""
        with self._lock:
            merged = _read(self.path)
            merged.update(self._dirty)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = {
                "version": VERSION,
                "device": self.device_name,
                "entries": {k: merged[k].to_dict() for k in sorted(merged)},
            }
            fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=str(self.path.parent))
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1)
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            self._entries = merged
            self._dirty.clear()
            return self.path


_CACHES: Dict[str, TuningCache] = {}
_CACHES_LOCK = threading.Lock()


def get_cache(device_name: str) -> TuningCache:
    """The process-wide cache object of one GPU name (its file is read on first lookup)."""
    key = f"{cache_dir()}::{device_name}"
    with _CACHES_LOCK:
        c = _CACHES.get(key)
        if c is None:
            c = _CACHES[key] = TuningCache(device_name)
        return c


def clear_memory() -> None:
    """Forget loaded caches (tests; a changed PYQUANT_CACHE_DIR)."""
    with _CACHES_LOCK:
        _CACHES.clear()
