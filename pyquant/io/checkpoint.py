"""pyquant checkpoints: a model with QuantLinear layers saved and loaded as packed tensors.

    pyquant.save_quantized(model, "out", tokenizer=tokenizer)
    model = pyquant.load_quantized("out")          # or AutoModelForCausalLM.from_pretrained("out")

Layout (what ``transformers``' ``save_pretrained`` writes for a model, so both
tools read and write the same directories): ``model.safetensors``, or shards
``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``;
``config.json`` with a ``quantization_config``::

    {"quant_method": "pyquant", "format_version": 1, "format": "int4_g128_asym_fp16",
     "method": "gptq", "layers": {"<layer>": "<format spec>", ...}, "pyquant_version": "..."}

``format`` is the format most layers use, ``layers`` names those that differ.
Each quantized layer stores its packed tensors under its own name
(``<layer>.qweight``, ``<layer>.scales``, ...) plus ``<layer>.format`` (the spec
as UTF-8 bytes) and ``<layer>.shape``: the state dict of a ``QuantLinear``.

Loading treats every file as untrusted (no pickle, headers checked, see
``safetensors_file.py``) and checks the whole checkpoint, quantization_config
against tensors against the model skeleton, before any layer of the model is
changed. The quantized layers are built straight from their packed tensors:
no float copy of a quantized weight exists at any moment.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .._version import __version__
from ..errors import FormatError, PyquantError
from ..formats import Format, QuantizedWeight
from ..formats.base import format_from_spec
from ..nn import QuantLinear
from .files import (CONFIG_NAME, INDEX_NAME, atomic_output, parse_size, read_json, safetensors_files, write_json,
                    write_safetensors)
from .safetensors_file import TensorEntry, read_header

QUANT_METHOD = "pyquant"
FORMAT_VERSION = 1
INDEX_FILE = INDEX_NAME
LAYER_INFO = ("format", "shape")  # what a QuantLinear stores besides its packed tensors and bias
_MAX_SPEC_BYTES = 256

__all__ = [
    "save_quantized", "load_quantized", "quantization_config_for", "read_checkpoint", "CheckpointPlan",
    "LayerPlan", "QuantSettings",
]


# --- quantization_config ------------------------------------------------------
def quantization_config_for(model: nn.Module, method: Optional[str] = None) -> dict:
    """The ``quantization_config`` that describes ``model``'s QuantLinear layers."""
    specs = {name: m.qformat.spec() for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not specs:
        raise FormatError("the model has no QuantLinear layer: quantize it first (quantize_model, replace_linear)")
    default = collections.Counter(specs.values()).most_common(1)[0][0]
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "format": default,
        "method": method,
        "layers": {name: spec for name, spec in specs.items() if spec != default},
        "pyquant_version": __version__,
    }


@dataclasses.dataclass(frozen=True)
class QuantSettings:
    """A checked ``quantization_config``: the format every layer has unless ``layers`` says otherwise."""

    format: Format
    layers: Dict[str, Format]
    method: Optional[str]

    def format_of(self, layer: str) -> Format:
        return self.layers.get(layer, self.format)


def parse_quantization_config(qc, where: str) -> QuantSettings:
    if not isinstance(qc, Mapping):
        raise FormatError(f"{where}: quantization_config must be a JSON object, got {type(qc).__name__}")
    if qc.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"{where}: quant_method is {qc.get('quant_method')!r}, not {QUANT_METHOD!r}")
    version = qc.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise FormatError(
            f"{where}: format_version {version!r} is not one this pyquant ({__version__}) reads (1..{FORMAT_VERSION})"
        )
    layers = qc.get("layers") or {}
    if not isinstance(layers, Mapping):
        raise FormatError(f"{where}: quantization_config.layers must map layer names to format specs")
    method = qc.get("method")
    return QuantSettings(
        format=_parse_spec(qc.get("format"), f"{where}: quantization_config.format"),
        layers={str(k): _parse_spec(v, f"{where}: quantization_config.layers[{k!r}]") for k, v in layers.items()},
        method=method if isinstance(method, str) else None,
    )


def _parse_spec(spec, where: str) -> Format:
    try:
        return format_from_spec(spec)
    except PyquantError as exc:
        raise FormatError(f"{where}: {exc}") from None


# --- what a checkpoint holds ----------------------------------------------------
@dataclasses.dataclass
class LayerPlan:
    """One quantized layer of a checkpoint, checked: its format, shape and where its tensors lie."""

    name: str
    format: Format
    shape: Tuple[int, int]
    packed: Dict[str, TensorEntry]
    bias: Optional[TensorEntry]

    def keys(self) -> List[str]:
        names = [*self.packed, *LAYER_INFO] + (["bias"] if self.bias is not None else [])
        return [f"{self.name}.{n}" for n in names]

    def module(self, device="cpu", dtype: Optional[torch.dtype] = None) -> QuantLinear:
        """The QuantLinear, read from the files (``device="meta"``: a skeleton that reads nothing)."""
        tensors = {n: e.read(device) for n, e in self.packed.items()}
        bias = None if self.bias is None else self.bias.read(device)
        if bias is not None and dtype is not None:
            bias = bias.to(dtype)
        return QuantLinear(QuantizedWeight(self.format, tensors, self.shape), bias)


@dataclasses.dataclass
class CheckpointPlan:
    """Every tensor of a checkpoint, its quantized layers and settings, checked against each other."""

    where: str  # config.json
    settings: QuantSettings
    tensors: Dict[str, TensorEntry]
    layers: Dict[str, LayerPlan]
    source: str  # where the tensors are listed: the one shard, or the index

    def other_keys(self) -> List[str]:
        """The tensors that belong to no quantized layer (embeddings, norms, a float head)."""
        taken = {k for lp in self.layers.values() for k in lp.keys()}
        return [k for k in self.tensors if k not in taken]


def read_tensor_table(files: Sequence[str], weight_map: Optional[Mapping[str, str]] = None,
                      where: str = "") -> Dict[str, TensorEntry]:
    """Name -> entry over all shards; a name in two shards, or not where the index says, is an error."""
    table: Dict[str, TensorEntry] = {}
    for path in files:
        for name, entry in read_header(path).items():
            if name in table:
                raise FormatError(f"{path}: tensor {name!r} is also in {table[name].path}")
            table[name] = entry
    for name, file in (weight_map or {}).items():
        entry = table.get(name)
        if entry is None or os.path.basename(entry.path) != file:
            raise FormatError(f"{where}: missing tensor {name!r}: the index puts it in {file}, which does not hold it")
    return table


def plan_layers(table: Mapping[str, TensorEntry], settings: QuantSettings, where: str,
                source: str) -> Dict[str, LayerPlan]:
    """Every quantized layer (a ``<layer>.format`` tensor), checked against the settings and its format;
    ``where`` names config.json, ``source`` the file that should list a missing tensor."""
    layers = {}
    for key, entry in table.items():
        if key.endswith(".format"):
            layer = key[: -len(".format")]
            layers[layer] = _plan_layer(layer, entry, table, settings, source)
    for layer in settings.layers:
        if layer not in layers:
            raise FormatError(
                f"{where}: quantization_config.layers names {layer!r} but there is no tensor {layer + '.format'!r}"
            )
    if not layers:
        raise FormatError(f"{where}: no quantized layer (no '<layer>.format' tensor) in the checkpoint")
    return layers


def _plan_layer(layer: str, fmt_entry: TensorEntry, table, settings: QuantSettings, source: str) -> LayerPlan:
    shape_entry = table.get(layer + ".shape")
    if shape_entry is None:
        raise FormatError(f"{source}: missing tensor {layer + '.shape'!r} (next to {fmt_entry.where})")
    fmt = _read_format(fmt_entry)
    shape = _read_shape(shape_entry)
    expected = settings.format_of(layer)
    if fmt != expected:
        raise FormatError(
            f"{fmt_entry.where} is {fmt.spec()!r} but config.json's quantization_config says {expected.spec()!r} "
            f"for layer {layer!r}"
        )
    try:
        fmt.check_shape(shape)
        specs = fmt.tensor_specs(shape)
    except PyquantError as exc:
        raise FormatError(f"{shape_entry.where}: {exc}") from None
    packed = {}
    for name, (tshape, dtype) in specs.items():
        entry = table.get(f"{layer}.{name}")
        if entry is None:
            raise FormatError(f"{source}: missing tensor {layer + '.' + name!r} of {fmt.spec()} layer {layer!r}")
        if entry.dtype != dtype:
            raise FormatError(f"{entry.where}: dtype {entry.dtype}, format {fmt.spec()} stores {name} as {dtype}")
        if entry.shape != tuple(tshape):
            raise FormatError(
                f"{entry.where}: shape {entry.shape}, format {fmt.spec()} stores {name} of a {shape} weight "
                f"as {tuple(tshape)}"
            )
        packed[name] = entry
    bias = table.get(layer + ".bias")
    if bias is not None and (bias.shape != (shape[0],) or not bias.dtype.is_floating_point):
        raise FormatError(f"{bias.where}: {bias.dtype} {bias.shape}, expected a float bias of shape ({shape[0]},)")
    return LayerPlan(layer, fmt, shape, packed, bias)


def _read_format(entry: TensorEntry) -> Format:
    if entry.dtype != torch.uint8 or len(entry.shape) != 1 or not 0 < entry.shape[0] <= _MAX_SPEC_BYTES:
        raise FormatError(f"{entry.where}: a format spec is 1-D uint8 of 1..{_MAX_SPEC_BYTES} bytes, got "
                          f"{entry.dtype} {entry.shape}")
    try:
        spec = bytes(entry.read().tolist()).decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{entry.where}: format spec is not UTF-8") from None
    return _parse_spec(spec, entry.where)


def _read_shape(entry: TensorEntry) -> Tuple[int, int]:
    if entry.dtype != torch.int64 or entry.shape != (2,):
        raise FormatError(f"{entry.where}: a layer shape is int64 (2,), got {entry.dtype} {entry.shape}")
    n, k = (int(v) for v in entry.read().tolist())
    if n < 1 or k < 1:
        raise FormatError(f"{entry.where}: weight shape ({n}, {k}) is not positive")
    return n, k


def plan_from_files(files: Sequence[str], quantization_config, where: str,
                    weight_map: Optional[Mapping[str, str]] = None) -> CheckpointPlan:
    """Read and check the headers of ``files`` against a quantization_config (nothing else is read)."""
    settings = parse_quantization_config(quantization_config, where)
    source = files[0] if len(files) == 1 else os.path.join(os.path.dirname(files[0]), INDEX_FILE)
    table = read_tensor_table(files, weight_map, source)
    return CheckpointPlan(where, settings, table, plan_layers(table, settings, where, source), source)


def read_checkpoint(directory: str) -> CheckpointPlan:
    """Check a checkpoint directory: config.json, index, shard headers, every quantized layer."""
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FormatError(f"{directory}: no {CONFIG_NAME}: not a pyquant checkpoint")
    config = read_json(config_path, CONFIG_NAME)
    qc = config.get("quantization_config")
    if qc is None:
        raise FormatError(f"{config_path}: no quantization_config: not a pyquant checkpoint")
    files, weight_map = safetensors_files(directory)
    return plan_from_files(files, qc, config_path, weight_map)


# --- the model side ---------------------------------------------------------------
def check_model(plan: CheckpointPlan, model: nn.Module, strict: bool = True) -> None:
    """Raise unless ``model`` has a linear of the right shape for each quantized layer and, with
    ``strict``, a place of the right shape for each other tensor and a tensor for each of its own
    (a tied tensor needs one for its group: shared in the module, or tied later as a transformers
    model's ``all_tied_weights_keys`` says)."""
    modules = dict(model.named_modules())
    for name, lp in plan.layers.items():
        mod = modules.get(name)
        if not isinstance(mod, (nn.Linear, QuantLinear)):
            what = "no module" if mod is None else type(mod).__name__
            raise FormatError(f"{plan.where}: tensor {name + '.format'!r} quantizes {name!r}, the model has {what} there")
        if (mod.out_features, mod.in_features) != lp.shape:
            raise FormatError(
                f"{plan.where}: tensor {name + '.shape'!r} is {lp.shape}, the model's {name} is "
                f"({mod.out_features}, {mod.in_features})"
            )
        if (mod.bias is None) != (lp.bias is None):
            has = "has" if lp.bias is not None else "has no"
            raise FormatError(f"{plan.where}: the checkpoint {has} tensor {name + '.bias'!r}, unlike the model's {name}")
    if strict:
        _check_other_tensors(plan, model)


def _check_other_tensors(plan: CheckpointPlan, model: nn.Module) -> None:
    own = model.state_dict(keep_vars=True)
    quantized = tuple(name + "." for name in plan.layers)
    own = {k: v for k, v in own.items() if not k.startswith(quantized)}
    for key in plan.other_keys():
        entry = plan.tensors[key]
        if key not in own:
            raise FormatError(f"{entry.where}: the model has no parameter or buffer {key!r}")
        if tuple(own[key].shape) != entry.shape:
            raise FormatError(f"{entry.where}: shape {entry.shape}, the model's {key} is {tuple(own[key].shape)}")
    tied_later = getattr(model, "all_tied_weights_keys", None) or {}
    for group in _tie_groups(own):
        group = group + [tied_later[k] for k in group if k in tied_later]
        if not any(k in plan.tensors for k in group):
            raise FormatError(f"{plan.source}: missing tensor {group[0]!r}")


def _tie_groups(state: Mapping[str, torch.Tensor]) -> List[List[str]]:
    """State-dict keys grouped by the tensor they share (a tied head and embedding: one group)."""
    groups: Dict[int, List[str]] = {}
    for key, t in state.items():
        groups.setdefault(id(t), []).append(key)
    return list(groups.values())


def install(model: nn.Module, plan: CheckpointPlan, device="cpu", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Read every tensor of a checked plan, then put the QuantLinear layers and the other tensors in."""
    quantized = {name: lp.module(device, dtype) for name, lp in plan.layers.items()}
    others = {}
    for key in plan.other_keys():
        t = plan.tensors[key].read(device)
        others[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    own = model.state_dict(keep_vars=True)
    for group in _tie_groups(own):  # a tied partner the file left out gets the same tensor
        present = next((k for k in group if k in others), None)
        for k in group:
            if present is not None and k not in others:
                others[k] = others[present]
    # From here on the model changes; nothing below reads a file or can fail a check.
    for name, mod in quantized.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, mod)
    model.load_state_dict(others, strict=False, assign=True)
    return model


# --- save ---------------------------------------------------------------------------
def save_quantized(model: nn.Module, directory, max_shard_size="2GB", *, tokenizer=None,
                   method: Optional[str] = None, overwrite: bool = False) -> str:
    """Write ``model`` (with QuantLinear layers) as a pyquant checkpoint directory; returns its path.

    ``max_shard_size``: bytes per safetensors shard (an int or "2GB", "500MB",
    "1GiB"). ``tokenizer``: saved beside the weights when given. ``method``:
    recorded in the quantization_config (the CLI passes the method it ran).
    A transformers model is written by its own ``save_pretrained`` (so
    ``from_pretrained`` reads it back), anything else by pyquant's writer with
    the same layout. The directory appears complete or not at all: everything
    is written under a temporary name, checked by reading it back, then renamed.
    ``overwrite``: replace an existing non-empty directory.
    """
    qc = quantization_config_for(model, method)
    limit = parse_size(max_shard_size)
    with atomic_output(directory, overwrite) as tmp:
        if hasattr(model, "save_pretrained") and hasattr(model, "config"):
            model.config.quantization_config = qc
            model.save_pretrained(tmp, max_shard_size=limit)
        else:
            _write_plain(model, tmp, qc, limit)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        check_model(read_checkpoint(tmp), model, strict=False)
    return os.fspath(directory)


def _write_plain(model: nn.Module, directory: str, qc: dict, limit: int) -> None:
    state, seen = {}, set()
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if ident is not None and ident in seen:  # a tied tensor: stored once, as safetensors requires
            continue
        seen.add(ident)
        state[key] = t
    write_safetensors(state, directory, limit)
    write_json(os.path.join(directory, CONFIG_NAME), {"quantization_config": qc})


# --- load ---------------------------------------------------------------------------
def load_quantized(directory_or_model_id, *, model: Optional[nn.Module] = None, device="cpu",
                   dtype: Optional[torch.dtype] = None, **from_pretrained_kwargs) -> nn.Module:
    """A model with QuantLinear layers from a pyquant checkpoint, built from the packed tensors.

    Without ``model``: the transformers model that ``config.json`` describes,
    through ``from_pretrained`` and pyquant's registered HfQuantizer (its
    skeleton is built on the meta device; ``from_pretrained_kwargs`` go
    there). With ``model``: that module (a skeleton, on the meta device or
    not) receives the checkpoint. Either way the whole checkpoint is checked
    before any layer changes. ``dtype`` casts the float tensors that are not
    packed (embeddings, norms, biases); packed tensors keep their format's dtypes.
    """
    directory = resolve_directory(directory_or_model_id)
    plan = read_checkpoint(directory)
    if model is None:
        return _load_transformers(directory, device, dtype, from_pretrained_kwargs)
    check_model(plan, model, strict=True)
    _check_unsaved_buffers(model)
    return install(model, plan, device, dtype).eval()


def _check_unsaved_buffers(model: nn.Module) -> None:
    """A non-persistent buffer is in no checkpoint: a skeleton must bring it real (transformers'
    from_pretrained recomputes its own; a plain module cannot be asked to)."""
    saved = set(model.state_dict(keep_vars=True))
    for name, buf in model.named_buffers():
        if buf.device.type == "meta" and name not in saved:
            raise FormatError(f"non-persistent buffer {name!r} of the model is on the meta device and no "
                              "checkpoint holds it: build the skeleton with real buffers")


def _load_transformers(directory: str, device, dtype, kwargs) -> nn.Module:
    import transformers

    config = read_json(os.path.join(directory, CONFIG_NAME))
    if "model_type" not in config:
        raise FormatError(f"{directory}: config.json describes no transformers model (saved from a plain module?): "
                          "pass load_quantized(..., model=<the module, e.g. built on the meta device>)")
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModelForCausalLM
    kwargs.setdefault("device_map", str(torch.device(device)))
    if dtype is not None:
        kwargs.setdefault("dtype", dtype)
    model = cls.from_pretrained(directory, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if getattr(getattr(quantizer, "quantization_config", None), "quant_method", None) != QUANT_METHOD:
        raise FormatError(f"{directory}: transformers did not load it through pyquant's quantizer "
                          "(is pyquant imported before transformers' model classes are used?)")
    return model


def resolve_directory(directory_or_model_id) -> str:
    """A local checkpoint directory, or a Hugging Face model id downloaded into the local cache."""
    path = os.fspath(directory_or_model_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise FormatError(f"{path} is a file; a pyquant checkpoint is a directory")
    if path.count("/") != 1 or path.startswith((".", "/")):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as exc:  # noqa: BLE001  (network, auth, missing repo: one message for all)
        raise FileNotFoundError(f"{path}: not a local directory and not downloadable as a model id: {exc}") from None
