"""The files of a checkpoint directory, for every layout pyquant reads or writes.

pyquant's own checkpoints and every peer's (GPTQ, AWQ, compressed-tensors, HQQ,
bitsandbytes) share the transformers layout: ``config.json`` and safetensors
weights, one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. This module is that layout's one reader and
writer of JSON, shard lists and shards, and the one way anything is written:
under a temporary name beside the destination, renamed when complete.

Reading treats the directory as untrusted: JSON files are bounded in size, an
index may name only plain ``.safetensors`` files beside it, every one present.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from ..errors import FormatError

MAX_JSON_BYTES = 64 << 20  # a 64 MiB config or index is far beyond any real one
CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


# --- JSON ------------------------------------------------------------------------------------
def read_json(path: str, what: str = "JSON file") -> dict:
    """A JSON object from ``path``, bounded in size; FormatError names the file."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read {what} ({exc.strerror})") from None
    if size > MAX_JSON_BYTES:
        raise FormatError(f"{path}: {what} is {size} bytes, more than the {MAX_JSON_BYTES} allowed")
    with open(path, "rb") as fh:
        raw = fh.read(MAX_JSON_BYTES + 1)
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path}: {what} is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: {what} must be a JSON object, got {type(value).__name__}")
    return value


def write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=2)
        fh.write("\n")


# --- which safetensors files -----------------------------------------------------------------
def _shard_path(directory: str, name, index_path: str) -> str:
    # An index is untrusted too: it may name only files beside it.
    plain = isinstance(name, str) and os.path.basename(name) == name and not name.startswith(".")
    if not plain or not name.endswith(".safetensors"):
        raise FormatError(f"{index_path}: weight_map names {name!r}, not a shard file in this directory")
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise FormatError(f"{index_path}: shard {name!r} is missing from {directory}")
    return path


def safetensors_files(directory: str) -> Tuple[List[str], Optional[Dict[str, str]]]:
    """The safetensors files of a checkpoint directory and, when an index lists them,
    its weight map (tensor name -> file name). Without an index, every
    ``*.safetensors`` file in the directory (peers name theirs freely)."""
    index_path = os.path.join(directory, INDEX_NAME)
    if os.path.isfile(index_path):
        weight_map = read_json(index_path, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(f"{index_path}: weight_map must be a non-empty object of tensor name -> file name")
        files = sorted({_shard_path(directory, f, index_path) for f in weight_map.values()})
        return files, weight_map
    if not os.path.isdir(directory):
        raise FormatError(f"{directory}: not a directory")
    files = sorted(os.path.join(directory, f) for f in os.listdir(directory)
                   if f.endswith(".safetensors") and not f.startswith("."))
    if not files:
        raise FormatError(f"{directory}: no .safetensors file and no {INDEX_NAME}: not a safetensors checkpoint")
    return files, None


# --- writing ---------------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """Bytes from an int or a string such as "2GB" (10^9, as transformers counts) or "1GiB"."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if m and m.group(2).upper() in _UNITS and float(m.group(1)) > 0:
        return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    raise FormatError(f"max_shard_size {size!r} is not a positive size such as 2GB, 500MB or 1GiB")


def _owning_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU, contiguous, alone in its storage: safetensors refuses tensors that
    share storage, and a view would write its whole base. Copies only when needed."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def write_safetensors(tensors: Mapping[str, torch.Tensor], directory: str, max_shard_size="2GB",
                      metadata: Optional[Dict[str, str]] = None) -> List[str]:
    """Write ``tensors`` in order as ``model.safetensors``, or as shards of at most
    ``max_shard_size`` bytes plus an index. Returns the file names."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file({k: _owning_copy(t) for k, t in shard.items()}, os.path.join(directory, name), metadata=meta)
    if len(shards) == 1:
        return names
    weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(os.path.join(directory, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + [INDEX_NAME]


def check_target(path, overwrite: bool = False, is_dir: bool = True) -> str:
    """The absolute ``path`` if it may be written: new, an empty directory, or anything
    with ``overwrite``; else FileExistsError, before any work is done."""
    final = os.path.abspath(os.fspath(path))
    if not os.path.lexists(final) or overwrite:
        if overwrite and os.path.lexists(final) and os.path.isdir(final) != is_dir:
            raise FileExistsError(f"{final} exists and is not a {'directory' if is_dir else 'file'}")
        return final
    if is_dir and os.path.isdir(final) and not os.listdir(final):
        return final
    what = "exists and is not empty" if os.path.isdir(final) else "exists"
    raise FileExistsError(f"{final} {what} (pass overwrite=True / --force to replace it)")


def _readable(path: str) -> None:
    """mkdtemp's and mkstemp's private modes are not what a saved model should have."""
    if not os.path.isdir(path):
        os.chmod(path, 0o644)
        return
    os.chmod(path, 0o755)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)


@contextlib.contextmanager
def atomic_output(path, overwrite: bool = False, is_dir: bool = True) -> Iterator[str]:
    """Yield a temporary directory (or file) beside ``path``; on success it becomes
    ``path`` in one rename, on any error it is removed and ``path`` is left as it was.
    ``path`` is checked (:func:`check_target`) before anything is written."""
    final = check_target(path, overwrite, is_dir)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(final)
    if is_dir:
        tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".partial", dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".partial", dir=parent)
        os.close(fd)
    try:
        yield tmp
        _readable(tmp)
        if os.path.lexists(final):
            old = tempfile.mkdtemp(prefix=f".{base}.", suffix=".old", dir=parent)
            os.rename(final, os.path.join(old, base))
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise


__all__ = [
    "CONFIG_NAME", "INDEX_NAME", "SINGLE_NAME", "atomic_output", "check_target", "parse_size", "read_json",
    "safetensors_files", "write_json", "write_safetensors",
]
