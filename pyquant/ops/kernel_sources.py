"""What source a GPU kernel is built from, and its hash: "verified" names a source.

A CUDA kernel is its ``.cu`` file plus every quoted header it reaches in
``csrc/cuda`` and ``csrc/include``; a Triton kernel is the modules of
``triton_kernels`` its launches run (listed by the backend when it registers the
kernel). The hash is SHA-256 over the files' paths (relative to their root) and
bytes, so editing, adding or removing any of them changes it. A GPU run records
the hash of each kernel that passed (``benchmarks/verified.py``) and dispatch
trusts an entry only while the hash of today's files is the same.

Where the files are not on disk (an install without ``csrc/``), the source cannot
be named and the hash is None: such a kernel is not verified.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable, List, Optional

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def include_closure(path: Path, include_dirs: Iterable[Path] = (CSRC / "include",)) -> List[Path]:
    """``path`` and every quoted include it reaches (its own folder first, then
    ``include_dirs``), sorted."""
    seen, todo = set(), [Path(path).resolve()]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for inc in _INCLUDE.findall(p.read_text()):
            for d in (p.parent, *include_dirs):
                q = (d / inc).resolve()
                if q.is_file():
                    todo.append(q)
                    break
    return sorted(seen)


def cuda_sources(*cu_files: str) -> List[Path]:
    """The files a CUDA kernel is built from: ``csrc/cuda/<name>`` and its includes
    (just the names where the sources are not installed: their hash is then None)."""
    out = set()
    for name in cu_files:
        path = CSRC / "cuda" / name
        out.update(include_closure(path) if path.is_file() else [path])
    return sorted(out)


def files_hash(files: Iterable[Path], root: Path) -> Optional[str]:
    """SHA-256 of the files' paths relative to ``root`` and their bytes; None when
    one is missing (an install without the sources)."""
    h = hashlib.sha256()
    for p in sorted(Path(f) for f in files):
        try:
            data = p.read_bytes()
        except OSError:
            return None
        try:
            rel = p.resolve().relative_to(Path(root).resolve())
        except ValueError:
            rel = p.name
        h.update(str(rel).encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()
