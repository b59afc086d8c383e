"""Whole-model import and export between pyquant and the other quantization ecosystems.

    from pyquant.io.exchange import export_model, import_model
    export_model(model, "out-gptq", "gptq")                 # AutoGPTQ / GPTQModel / transformers
    export_model(model, "out-ct", "compressed-tensors")     # vLLM, SGLang, transformers
    export_model(model, "model-q4_k.gguf", "gguf", tokenizer=tok)   # llama.cpp
    model = import_model("some-awq-checkpoint")             # format sniffed

Formats: ``"gptq"``, ``"awq"``, ``"compressed-tensors"``, ``"hqq"``, ``"bnb"``
(bitsandbytes NF4), ``"gguf"``. Every quantized layer converts losslessly:
the peer's dequantized weight is pyquant's, bit for bit (HQQ with an fp16
compute dtype rounds once more on its side; see :mod:`pyquant.io.hqq`).
A layer a format cannot hold exactly is refused with the reason and the
option that makes it exportable, never rounded.

Export writes under a temporary name next to ``out`` and renames at the end:
an error leaves nothing behind, an existing ``out`` is replaced only with
``overwrite=True``. Import builds every layer from the files (checked against
the format: names, dtypes, shapes, values in range) before the model is built.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import FormatError
from ..formats import NF4, Int, QuantizedWeight
from . import awq, bnb, gptq, hqq
from . import compressed_tensors as ct
from .files import atomic_output, read_json, write_json, write_safetensors
from .hf_dir import TensorDir, read_config
from .hf_model import build_model, config_dict, float_linears, float_tensors, install, quantized_layers

FORMATS = ("gptq", "awq", "compressed-tensors", "gguf", "hqq", "bnb")
_QUANT_METHODS = {"gptq": "gptq", "awq": "awq", "compressed-tensors": "compressed-tensors", "hqq": "hqq",
                  "bitsandbytes": "bnb"}
_COMMON_OPTIONS = ("tokenizer", "overwrite", "max_shard_size")


# --- export ----------------------------------------------------------------------------------
def _output_head(model: nn.Module) -> Optional[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, mod in model.named_modules() if head is not None and mod is head), None)


def _same_int(layers: Mapping[str, "nn.Module"], what: str, **required) -> Int:
    """The one Int format (bits, group size) every layer shares; names the odd layer out."""
    first_name, first = None, None
    for name, mod in layers.items():
        fmt = mod.qformat
        if not isinstance(fmt, Int):
            raise FormatError(f"{what} holds Int weights; layer {name!r} is {fmt.spec()}")
        for attr, value in required.items():
            if getattr(fmt, attr) != value:
                raise FormatError(f"{what} needs {attr}={value}; layer {name!r} is {fmt.spec()}")
        if first is None:
            first_name, first = name, fmt
        elif (fmt.bits, fmt.group_size) != (first.bits, first.group_size):
            raise FormatError(
                f"{what} stores one bits/group_size for the whole model; layer {name!r} is {fmt.spec()} "
                f"but {first_name!r} is {first.spec()}"
            )
    return first


def _no_float_linears(model: nn.Module, what: str) -> None:
    head = _output_head(model)
    left = [name for name in float_linears(model) if name != head]
    if left:
        raise FormatError(
            f"{what} loaders quantize every linear layer but the output head; these are still float: {left[:6]}"
        )


def _layer_tensors(model, export_one: Callable[[str, QuantizedWeight], Dict[str, torch.Tensor]]):
    layers = quantized_layers(model)
    tensors: Dict[str, torch.Tensor] = {}
    for name, mod in layers.items():
        try:
            converted = export_one(name, mod.quantized_weight.cpu())
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"layer {name!r}: {exc}") from exc
        tensors.update({f"{name}.{key}": t for key, t in converted.items()})
        if mod.bias is not None:
            tensors[f"{name}.bias"] = mod.bias.detach()
    tensors.update(float_tensors(model, layers))
    return layers, tensors


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _export_gptq(model, options):
    checkpoint_format = options.pop("checkpoint_format", "gptq")
    layers = quantized_layers(model)
    fmt = _same_int(layers, "GPTQ")
    _no_float_linears(model, "GPTQ")
    _, tensors = _layer_tensors(model, lambda name, qw: gptq.export_layer(qw, checkpoint_format))
    act_order = any(m.qformat.act_order for m in layers.values())
    sym = all(m.qformat.symmetric for m in layers.values())
    q = gptq.quantization_config(Int(fmt.bits, fmt.group_size, sym), act_order, checkpoint_format)
    return tensors, q, {"quantize_config.json": q}


def _export_awq(model, options):
    layers = quantized_layers(model)
    fmt = _same_int(layers, "AWQ", bits=4, act_order=False)
    _, tensors = _layer_tensors(model, lambda name, qw: awq.export_layer(qw))
    q = awq.quantization_config(fmt)
    skip = [n for n in float_linears(model) if n != _output_head(model)]
    q["modules_to_not_convert"] = skip or None
    return tensors, q, {}


def _export_compressed_tensors(model, options):
    dtype = _model_dtype(model)
    groups: Dict[Tuple, Tuple[Dict, List[str]]] = {}
    for name, mod in quantized_layers(model).items():
        try:
            args = ct.weight_args(mod.qformat, mod.in_features)
        except ValueError as exc:
            raise type(exc)(f"layer {name!r}: {exc}") from exc
        groups.setdefault(tuple(sorted((k, str(v)) for k, v in args.items())), (args, []))[1].append(name)
    _, tensors = _layer_tensors(model, lambda name, qw: ct.export_layer(qw, dtype))
    return tensors, ct.quantization_config(groups, list(float_linears(model))), {}


def _export_hqq(model, options):
    layers, tensors = _layer_tensors(model, lambda name, qw: hqq.export_layer(qw))
    mod = next(iter(layers.values()))
    return tensors, hqq.quantization_config(mod.qformat, mod.in_features, list(float_linears(model))), {}


def _export_bnb(model, options):
    dtype = _model_dtype(model)
    layers = quantized_layers(model)
    for name, mod in layers.items():
        if not isinstance(mod.qformat, NF4):
            raise FormatError(f"bitsandbytes 4-bit checkpoints hold NF4 weights; layer {name!r} is {mod.qformat.spec()}")
    _, tensors = _layer_tensors(model, lambda name, qw: bnb.export_layer(qw, dtype))
    fmt = next(iter(layers.values())).qformat
    return tensors, bnb.quantization_config(fmt, dtype, list(float_linears(model))), {}


_EXPORTERS = {
    "gptq": (_export_gptq, ("checkpoint_format",)),
    "awq": (_export_awq, ()),
    "compressed-tensors": (_export_compressed_tensors, ()),
    "hqq": (_export_hqq, ()),
    "bnb": (_export_bnb, ()),
}


def _check_options(fmt: str, options: Mapping, allowed) -> None:
    unknown = sorted(set(options) - set(allowed) - set(_COMMON_OPTIONS))
    if unknown:
        raise FormatError(
            f"export format {fmt!r} takes no option {unknown}; it takes {sorted(set(allowed) | set(_COMMON_OPTIONS))}"
        )


def export_model(model: nn.Module, out_dir, format: str, **options) -> str:
    """Write ``model`` (with QuantLinear layers) as a ``format`` checkpoint. Returns the written path.

    Options for every format: ``tokenizer`` (saved alongside; GGUF embeds its
    vocabulary), ``overwrite`` (replace an existing ``out_dir``),
    ``max_shard_size`` (safetensors formats, default ``"2GB"``).
    ``gptq``: ``checkpoint_format="gptq"`` (v1 zeros, AutoGPTQ) or ``"gptq_v2"`` (GPTQModel).
    ``gguf``: ``out_dir`` ending in ``.gguf`` is the file itself, otherwise the file
    is ``out_dir/model.gguf``; see :func:`pyquant.io.gguf_model.export_gguf` for its options.
    """
    if format not in FORMATS:
        raise FormatError(f"unknown export format {format!r}; supported: {list(FORMATS)}")
    if not isinstance(model, nn.Module):
        raise FormatError(f"export_model needs a torch.nn.Module, got {type(model).__name__}")
    options = dict(options)
    if not quantized_layers(model):
        raise FormatError(f"{type(model).__name__} has no QuantLinear layer: quantize it before exporting")
    if format == "gguf":
        from .gguf_model import export_gguf

        return export_gguf(model, out_dir, **options)
    exporter, allowed = _EXPORTERS[format]
    _check_options(format, options, allowed)
    tokenizer = options.pop("tokenizer", None)
    overwrite = bool(options.pop("overwrite", False))
    max_shard_size = options.pop("max_shard_size", "2GB")
    config = config_dict(model)
    tensors, qconfig, extra_json = exporter(model, options)
    config["quantization_config"] = qconfig
    with atomic_output(out_dir, overwrite=overwrite) as tmp:
        write_safetensors(tensors, tmp, max_shard_size=max_shard_size)
        write_json(os.path.join(tmp, "config.json"), config)
        for name, value in extra_json.items():
            write_json(os.path.join(tmp, name), value)
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return os.path.abspath(os.fspath(out_dir))


# --- import ----------------------------------------------------------------------------------
def _import_gptq(tensors, settings, name):
    bits, group, checkpoint_format = settings
    return gptq.import_layer(tensors, bits, group, checkpoint_format)


def _import_awq(tensors, settings, name):
    bits, group = settings
    return awq.import_layer(tensors, bits, group)


_IMPORTERS = {
    # format: (marker tensor suffix, layer tensor suffixes, settings parser, layer importer)
    "gptq": ("qweight", gptq.LAYER_TENSORS, gptq.parse_quantization_config, _import_gptq),
    "awq": ("qweight", awq.LAYER_TENSORS, awq.parse_quantization_config, _import_awq),
    "compressed-tensors": (
        "weight_scale", ct.LAYER_TENSORS, lambda q, where: ct.Scheme(q, where),
        lambda tensors, scheme, name: ct.import_layer(tensors, scheme.args_for(name)),
    ),
    "hqq": ("W_q", hqq.LAYER_TENSORS, lambda q, where: None, lambda tensors, _, name: hqq.import_layer(tensors)),
    "bnb": (
        bnb.LAYER_MARKER, None, lambda q, where: None, lambda tensors, _, name: bnb.import_layer(tensors),
    ),
}


def _directory_quant_config(path: str, config: dict) -> dict:
    q = config.get("quantization_config")
    if q is None:
        for name in ("quantize_config.json", "quant_config.json"):  # AutoGPTQ's / AutoAWQ's own files
            if os.path.isfile(os.path.join(path, name)):
                q = read_json(os.path.join(path, name), name)
                if name == "quant_config.json":
                    q.setdefault("quant_method", "awq")
                q.setdefault("quant_method", "gptq")
                break
    if q is None:
        return {}
    if not isinstance(q, dict):
        raise FormatError(f"{path}: quantization_config must be an object")
    return q


def sniff_format(path) -> str:
    """The exchange format of a file or checkpoint directory."""
    path = os.fspath(path)
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            if fh.read(4) == b"GGUF":
                return "gguf"
        raise FormatError(f"{path}: a file that is not GGUF; the other formats are checkpoint directories")
    if not os.path.isdir(path):
        raise FormatError(f"{path}: no such file or directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
        if len(ggufs) == 1:
            return "gguf"
        raise FormatError(f"{path}: no config.json (and not exactly one .gguf file)")
    q = _directory_quant_config(path, read_config(path))
    method = q.get("quant_method")
    if method == "pyquant":
        raise FormatError(f"{path}: a pyquant checkpoint; load it with pyquant.load_quantized")
    if method in _QUANT_METHODS:
        return _QUANT_METHODS[method]
    keys = TensorDir(path).keys()
    if any(k.endswith(".W_q") for k in keys):
        return "hqq"
    raise FormatError(f"{path}: quant_method {method!r} is not one of {sorted(_QUANT_METHODS)}")


def _gguf_path(path: str) -> str:
    if os.path.isdir(path):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) != 1:
            raise FormatError(f"{path}: expected exactly one .gguf file, found {ggufs}")
        return os.path.join(path, ggufs[0])
    return path


def import_model(path, format: Optional[str] = None, **options) -> nn.Module:
    """A transformers model with QuantLinear layers from a checkpoint of another ecosystem.

    ``format`` as in :func:`export_model`; sniffed from the files when None.
    Options: ``dtype`` (float dtype of the unquantized parts; default the
    checkpoint's). GGUF: see :func:`pyquant.io.gguf_model.load_gguf_quantized`.
    """
    path = os.fspath(path)
    if format is None:
        format = sniff_format(path)
    if format not in FORMATS:
        raise FormatError(f"unknown import format {format!r}; supported: {list(FORMATS)}")
    if format == "gguf":
        from .gguf_model import load_gguf_quantized

        return load_gguf_quantized(_gguf_path(path), **options)
    unknown = sorted(set(options) - {"dtype"})
    if unknown:
        raise FormatError(f"import format {format!r} takes no option {unknown}; it takes ['dtype']")
    marker, suffixes, parse, import_one = _IMPORTERS[format]
    config = read_config(path)
    where = os.path.join(path, "config.json")
    settings = parse(_directory_quant_config(path, config), where)
    td = TensorDir(path)
    keys = td.keys()
    prefixes = sorted(k[: -len(marker) - 1] for k in keys if k.endswith("." + marker))
    if not prefixes:
        raise FormatError(f"{path}: no quantized layer (no tensor named '*.{marker}') in a {format} checkpoint")
    layers, used = {}, set()
    for prefix in prefixes:
        if suffixes is None:  # bitsandbytes: the layer's entries are weight and weight.*
            names = [k for k in keys if k == f"{prefix}.weight" or k.startswith(f"{prefix}.weight.")]
        else:
            names = [f"{prefix}.{s}" for s in suffixes if f"{prefix}.{s}" in td]
        tensors = {n[len(prefix) + 1:]: td.get(n) for n in names}
        try:
            qw = import_one(tensors, settings, prefix)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{td.file_of(names[0])}: layer {prefix!r}: {exc}") from exc
        bias_key = f"{prefix}.bias"
        bias = td.get(bias_key, ndim=1) if bias_key in td else None
        layers[prefix] = (qw, bias)
        used.update(names)
        used.add(bias_key)
    rest = {k: td.get(k) for k in keys if k not in used}
    shapes = {k: tuple(t.shape) for k, t in rest.items()}
    for prefix, (qw, bias) in layers.items():
        shapes[f"{prefix}.weight"] = qw.shape
        if bias is not None:
            shapes[f"{prefix}.bias"] = tuple(bias.shape)
    model = build_model(path, config, options.get("dtype"), shapes)
    return install(model, layers, rest, path)


__all__ = ["export_model", "import_model", "sniff_format", "FORMATS"]
