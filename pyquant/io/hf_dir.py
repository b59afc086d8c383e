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

The directory's files themselves (JSON, the shard list, writing) are
``files.py``'s, shared with pyquant's own checkpoints.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import DtypeError, FormatError
from .files import CONFIG_NAME, INDEX_NAME, read_json, safetensors_files


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


class TensorDir:
    """The safetensors tensors of a checkpoint directory (see the module docstring)."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise FormatError(f"{self.directory}: not a directory")
        files, weight_map = safetensors_files(self.directory)
        index_path = os.path.join(self.directory, INDEX_NAME)
        self._handles = {}
        self._where: Dict[str, str] = {}
        for path in files:
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


__all__ = ["TensorDir", "read_config"]
