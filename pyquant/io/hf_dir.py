"""Checkpoint directories in the transformers layout, read as untrusted input.

A directory holds ``config.json`` and safetensors weights: one
``model.safetensors``, or shards listed by ``model.safetensors.index.json``.
Every ecosystem pyquant exchanges with (GPTQ, AWQ, compressed-tensors, HQQ,
bitsandbytes) stores its checkpoints this way; only the tensor names and the
``quantization_config`` differ.

Reading: safetensors files never execute code (no pickle), and the safetensors
library checks the header against the file (JSON size, every tensor's offsets
inside the data, dtype x shape = byte count) when a file is opened. On top of
that, :class:`TensorDir` checks what a directory adds: shard names from the
index must be plain file names inside the directory, every indexed tensor must
be in its shard, no tensor may appear in two shards, JSON files are bounded in
size. Tensors are read one at a time, after their dtype and shape were checked
against what the caller expects, so a header field never causes an allocation
larger than the tensor the file really holds. Errors are
:class:`pyquant.FormatError` naming the file and the tensor.

Writing: :func:`atomic_output` builds the result under a temporary name next to
the destination and renames it at the end, so an error leaves nothing
half-written.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import DtypeError, FormatError, ShapeError

MAX_JSON_BYTES = 64 << 20  # a 64 MiB config or index is far beyond any real one
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def read_json(path: str, what: str) -> dict:
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


def read_config(directory: str) -> dict:
    """``config.json`` of a checkpoint directory."""
    return read_json(os.path.join(directory, CONFIG_NAME), "config.json")


def _safetensors_dtype(name: str) -> torch.dtype:
    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    if name not in table:
        raise DtypeError(f"safetensors dtype {name} has no place in a pyquant import")
    return table[name]


def _plain_shard_name(directory: str, name, index_path: str) -> str:
    if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
        raise FormatError(f"{index_path}: shard name {name!r} is not a plain file name inside the directory")
    if not name.endswith(".safetensors"):
        raise FormatError(f"{index_path}: shard {name!r} is not a .safetensors file")
    return os.path.join(directory, name)


class TensorDir:
    """The safetensors tensors of a checkpoint directory (see the module docstring)."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise FormatError(f"{self.directory}: not a directory")
        index_path = os.path.join(self.directory, INDEX_NAME)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise FormatError(f"{index_path}: weight_map must be a non-empty object")
            files = sorted({_plain_shard_name(self.directory, f, index_path) for f in weight_map.values()})
        else:
            weight_map = None
            files = sorted(
                os.path.join(self.directory, f) for f in os.listdir(self.directory) if f.endswith(".safetensors")
            )
            if not files:
                raise FormatError(f"{self.directory}: no .safetensors file and no {INDEX_NAME}")
        self._handles = {}
        self._where: Dict[str, str] = {}
        for path in files:
            if not os.path.isfile(path):
                raise FormatError(f"{path}: shard listed in {INDEX_NAME} does not exist")
            try:
                handle = safe_open(path, framework="pt")
            except Exception as exc:  # safetensors raises its own error type for every header fault
                raise FormatError(f"{path}: not a valid safetensors file ({exc})") from None
            self._handles[path] = handle
            for key in handle.keys():
                if key in self._where:
                    raise FormatError(f"{path}: tensor {key!r} is also in {self._where[key]}")
                self._where[key] = path
        if weight_map is not None:
            for key, shard in weight_map.items():
                where = self._where.get(key)
                if where is None or os.path.basename(where) != shard:
                    raise FormatError(f"{index_path}: tensor {key!r} is listed in {shard!r} but is not there")

    def keys(self) -> List[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file_of(self, key: str) -> str:
        if key not in self._where:
            raise FormatError(f"{self.directory}: no tensor {key!r} in the checkpoint")
        return self._where[key]

    def info(self, key: str) -> Tuple[torch.dtype, Tuple[int, ...]]:
        """(dtype, shape) from the header, without reading the data."""
        path = self.file_of(key)
        sl = self._handles[path].get_slice(key)
        try:
            dtype = _safetensors_dtype(sl.get_dtype())
        except DtypeError as exc:
            raise FormatError(f"{path}: tensor {key!r}: {exc}") from None
        return dtype, tuple(int(d) for d in sl.get_shape())

    def get(
        self,
        key: str,
        dtype=None,
        shape: Optional[Sequence[int]] = None,
        ndim: Optional[int] = None,
    ) -> torch.Tensor:
        """Tensor ``key`` after checking dtype (one dtype or a tuple), shape or rank."""
        path = self.file_of(key)
        got_dtype, got_shape = self.info(key)
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if dtype is not None and got_dtype not in allowed:
            names = " or ".join(str(d) for d in allowed)
            raise FormatError(f"{path}: tensor {key!r} must be {names}, got {got_dtype}")
        if shape is not None and got_shape != tuple(shape):
            raise FormatError(f"{path}: tensor {key!r} must have shape {tuple(shape)}, got {got_shape}")
        if ndim is not None and len(got_shape) != ndim:
            raise FormatError(f"{path}: tensor {key!r} must have {ndim} dims, got shape {got_shape}")
        return self._handles[path].get_tensor(key)

    def scalar(self, key: str, kinds=(torch.int32, torch.int64, torch.uint8, torch.int16, torch.int8)) -> int:
        """An integer stored as a 0-d or 1-element tensor."""
        t = self.get(key, dtype=tuple(kinds))
        if t.numel() != 1:
            raise FormatError(f"{self.file_of(key)}: tensor {key!r} must hold one value, got shape {tuple(t.shape)}")
        return int(t.reshape(()).item())


@contextlib.contextmanager
def atomic_output(path: str, overwrite: bool = False, is_dir: bool = True) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    On any error the temporary file or directory is removed and ``path`` is left
    as it was. An existing ``path`` is replaced only with ``overwrite=True``.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(path)
    if is_dir:
        tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".partial", dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".partial", dir=parent)
        os.close(fd)
    try:
        yield tmp
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".{base}.", suffix=".old", dir=parent)
            os.rename(path, os.path.join(old, base))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise


def parse_size(size) -> int:
    """``"2GB"``/``"500MB"``/int bytes -> bytes."""
    if isinstance(size, int) and size > 0:
        return size
    if isinstance(size, str):
        s = size.strip().upper()
        for unit, mult in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6),
                           ("KB", 10**3), ("B", 1)):
            if s.endswith(unit):
                try:
                    value = float(s[: -len(unit)])
                except ValueError:
                    break
                if value > 0:
                    return int(value * mult)
    raise ShapeError(f"max_shard_size must be a positive byte count or a string like '2GB', got {size!r}")


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    directory: str,
    max_shard_size="2GB",
    metadata: Optional[Dict[str, str]] = None,
) -> List[str]:
    """Write ``tensors`` as ``model.safetensors`` or as shards plus an index. Returns the file names."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        # safetensors refuses views that share storage: each tensor gets its own copy.
        shards[-1][key] = t.detach().to("cpu").contiguous().clone()
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SINGLE_NAME), metadata=meta)
        return [SINGLE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(directory, name), metadata=meta)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    write_json(os.path.join(directory, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + [INDEX_NAME]


def write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=2, sort_keys=False)
        fh.write("\n")


__all__ = [
    "TensorDir", "atomic_output", "read_json", "read_config", "write_safetensors",
    "write_json", "parse_size",
]
