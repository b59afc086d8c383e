"""What a checkpoint or GGUF file holds, per tensor or quantized layer: format, shape, bits per weight.

``describe(path)`` reads headers only (a pyquant checkpoint directory, any
directory of safetensors shards, a ``.safetensors`` file, a ``.gguf`` file),
with the same checks as loading, and returns an :class:`Inventory` that the
command line prints (``pyquant inspect``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Tuple

from ..errors import FormatError
from . import checkpoint
from .files import CONFIG_NAME, read_json, safetensors_files
from .gguf import GGUFFile
from .safetensors_file import read_header

__all__ = ["Inventory", "describe"]


@dataclasses.dataclass
class Inventory:
    """``rows``: (name, format, shape, bits per weight) per quantized layer or tensor."""

    path: str
    kind: str
    rows: List[Tuple[str, str, str, float]]
    notes: List[str] = dataclasses.field(default_factory=list)

    @property
    def total_bits(self) -> float:
        return sum(bpw * _numel(shape) for _, _, shape, bpw in self.rows)

    @property
    def n_weights(self) -> int:
        return sum(_numel(shape) for _, _, shape, _ in self.rows)


def _numel(shape: str) -> int:
    n = 1
    for d in shape.split("x"):
        n *= int(d) if d else 1
    return n


def _shape(dims) -> str:
    return "x".join(str(d) for d in dims) if len(dims) else "1"


def describe(path) -> Inventory:
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, CONFIG_NAME)):
            config = read_json(os.path.join(path, CONFIG_NAME), CONFIG_NAME)
            qc = config.get("quantization_config")
            if isinstance(qc, dict) and qc.get("quant_method") == checkpoint.QUANT_METHOD:
                return _pyquant_checkpoint(path)
        files, _ = safetensors_files(path)
        return _safetensors(path, files)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.endswith(".gguf"):
        return _gguf(path)
    if path.endswith(".safetensors"):
        return _safetensors(path, [path])
    raise FormatError(f"{path}: not a checkpoint directory, a .safetensors file or a .gguf file")


def _pyquant_checkpoint(path: str) -> Inventory:
    plan = checkpoint.read_checkpoint(path)
    rows = [(name, lp.format.spec(), _shape(lp.shape), lp.format.bits_per_weight(lp.shape))
            for name, lp in plan.layers.items()]
    rows += _dense_rows(plan.tensors[k] for k in plan.other_keys())
    method = plan.settings.method or "unrecorded"
    return Inventory(path, f"pyquant checkpoint (method {method}, {len(plan.layers)} quantized layers)", rows)


def _safetensors(path: str, files) -> Inventory:
    entries = []
    for f in files:
        entries.extend(read_header(f).values())
    return Inventory(path, f"safetensors ({len(files)} file(s); no pyquant quantization_config)", _dense_rows(entries))


def _dense_rows(entries):
    return [(e.name, str(e.dtype).replace("torch.", ""), _shape(e.shape), e.dtype.itemsize * 8) for e in entries]


def _gguf(path: str) -> Inventory:
    rows = []
    with GGUFFile(path) as f:
        arch = f.metadata.get("general.architecture", "?")
        for name in f.tensor_names():
            info = f.tensor_info(name)
            numel = _numel(_shape(info.shape))
            rows.append((name, info.type_name, _shape(info.shape), info.nbytes * 8 / max(numel, 1)))
    return Inventory(path, f"GGUF (architecture {arch}, {len(rows)} tensors)", rows)
