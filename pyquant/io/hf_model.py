"""Models on both sides of an exchange: what to export, and how an import is put together.

Export reads a model's ``QuantLinear`` layers and its remaining float tensors.
Import builds the transformers model named by ``config.json`` (weights left
uninitialised: every one is overwritten), swaps the quantized linears for
``QuantLinear`` modules built straight from the packed tensors and loads the
float tensors, checking that every parameter got a value and no tensor was left
over. All converted layers are built *before* the model is touched, so a bad
tensor fails the import without a half-built model.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from ..errors import FormatError, ShapeError
from ..formats import QuantizedWeight
from ..nn import QuantLinear


def quantized_layers(model: nn.Module) -> Dict[str, QuantLinear]:
    """Name -> QuantLinear of every quantized linear in ``model``."""
    if not isinstance(model, nn.Module):
        raise FormatError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, QuantLinear)}


def float_linears(model: nn.Module) -> Dict[str, nn.Linear]:
    """Name -> nn.Linear of the linears left in float (the head, skipped layers)."""
    return {name: mod for name, mod in model.named_modules() if type(mod) is nn.Linear}


def float_tensors(model: nn.Module, quantized: Mapping[str, QuantLinear]) -> Dict[str, torch.Tensor]:
    """The state dict of everything but the quantized layers' packed buffers.

    Tied tensors (an output head sharing the embedding) are written once, under
    the first name, as transformers does; its loader ties them again.
    """
    skip = tuple(f"{name}." for name in quantized)
    out: Dict[str, torch.Tensor] = {}
    seen: Set[Tuple[int, Tuple[int, ...]]] = set()
    for key, t in model.state_dict().items():
        if key.startswith(skip):
            continue
        ident = (t.data_ptr(), tuple(t.shape))
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = t
    return out


def config_dict(model: nn.Module) -> dict:
    """``model.config`` as a plain dict without any quantization_config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise FormatError(
            f"{type(model).__name__} has no transformers config: exchange formats store a config.json "
            "that peers use to rebuild the model"
        )
    d = config.to_dict()
    d.pop("quantization_config", None)
    return d


def build_model(
    directory: str,
    config: dict,
    dtype: Optional[torch.dtype] = None,
    shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
) -> nn.Module:
    """The transformers model that ``config`` (a config.json dict) describes, weights uninitialised.

    ``shapes``: parameter name -> shape of what the checkpoint holds. The config
    is checked against them first (layer count, then every parameter's shape on
    a meta-device skeleton, which costs no memory), so a config.json cannot make
    the import allocate more than the checkpoint's own tensors.
    """
    import transformers

    from ..integrations.transformers import _no_init  # skips the random init of weights about to be overwritten

    path = os.path.join(directory, "config.json")
    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = clean.pop("model_type", None)
    if not isinstance(model_type, str):
        raise FormatError(f"{path}: model_type must be a string, got {model_type!r}")
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **clean)
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{path}: transformers cannot build a config for model_type {model_type!r} ({exc})") from None
    arch = (clean.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = None
    if dtype is None:
        name = clean.get("dtype", clean.get("torch_dtype"))
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            dtype = torch.float32

    def instantiate():
        if cls is not None:
            return cls._from_config(cfg, dtype=dtype) if hasattr(cls, "_from_config") else cls(cfg)
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)

    if shapes is not None:
        _check_layer_count(path, getattr(cfg, "num_hidden_layers", None), shapes)
        with torch.device("meta"):
            skeleton = instantiate()
        for name, p in skeleton.named_parameters():
            if name in shapes and tuple(shapes[name]) != tuple(p.shape):
                raise FormatError(
                    f"{directory}: tensor {name!r} has shape {tuple(shapes[name])}, config.json gives {tuple(p.shape)}"
                )
    with _no_init():
        model = instantiate()
    return model.to(dtype).eval()


def _check_layer_count(path: str, layers, shapes: Mapping[str, Tuple[int, ...]]) -> None:
    """``num_hidden_layers`` may not exceed the blocks the checkpoint has tensors for."""
    if not isinstance(layers, int):
        return
    indices = {int(m) for key in shapes for m in re.findall(r"\.(\d+)\.", key)}
    if layers > max(indices, default=-1) + 1:
        raise FormatError(
            f"{path}: num_hidden_layers={layers} but the checkpoint has tensors for {max(indices, default=-1) + 1} blocks"
        )


def install(
    model: nn.Module,
    layers: Mapping[str, Tuple[QuantizedWeight, Optional[torch.Tensor]]],
    tensors: Mapping[str, torch.Tensor],
    source: str,
) -> nn.Module:
    """Replace ``layers`` (name -> (weight, bias)) by QuantLinear and load ``tensors`` into the rest."""
    modules = dict(model.named_modules())
    for name, (qw, bias) in layers.items():
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear):
            raise FormatError(f"{source}: quantized layer {name!r} is not a linear layer of {type(model).__name__}")
        if tuple(mod.weight.shape) != qw.shape:
            raise ShapeError(
                f"{source}: quantized layer {name!r} has shape {qw.shape}, the model's config gives "
                f"{tuple(mod.weight.shape)}"
            )
        if (bias is None) != (mod.bias is None):
            raise FormatError(f"{source}: layer {name!r} bias {'missing' if bias is None else 'unexpected'}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for name, (qw, bias) in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(qw, None if bias is None else bias.to(dtype)))
    # assign=True keeps the file's tensors: give floats the dtype the model was built with.
    targets = model.state_dict()
    tensors = {
        k: v.to(targets[k].dtype) if k in targets and v.is_floating_point() and targets[k].is_floating_point() else v
        for k, v in tensors.items()
    }
    result = model.load_state_dict(tensors, strict=False, assign=True)
    unexpected = list(result.unexpected_keys)
    if unexpected:
        raise FormatError(f"{source}: tensors with no place in {type(model).__name__}: {unexpected[:8]}")
    quant_keys = {f"{n}.{b}" for n, m in quantized_layers(model).items() for b, _ in m.named_buffers(recurse=False)}
    missing = [k for k in result.missing_keys if k not in quant_keys]
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied]
    if missing:
        raise FormatError(f"{source}: no tensor for {missing[:8]}")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _tied_keys(model: nn.Module) -> Set[str]:
    """Parameter names that transformers ties to another one (the output head)."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or type(head) is not nn.Linear:
        return set()
    return {f"{name}.weight" for name, mod in model.named_modules() if mod is head}
