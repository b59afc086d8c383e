"""LoRA adapters on frozen quantized layers (QLoRA).

    pyquant.add_lora(model, r=16, alpha=32, target_modules=["q_proj", "v_proj"])
    ...train: only lora_A / lora_B require grad...
    pyquant.save_adapters(model, "adapters.safetensors")
    pyquant.load_adapters(model, "adapters.safetensors")
    pyquant.merge_lora(model)  # back to QuantLinear layers, requantized

:class:`LoRALinear` wraps a ``QuantLinear`` (or a float ``nn.Linear``) and adds
``scaling * B @ A`` to its weight: ``y = base(x) + scaling * dropout(x) @ A.T @
B.T``. On a QuantLinear, forward and backward are one op,
``torch.ops.pyquant.lora_qmatmul``: the low-rank term goes into the quantized
matmul's epilogue, and the backward computes ``grad_x`` with the packed weight
(``qmatmul_transposed``) and ``grad_A``/``grad_B`` from the saved r-wide
``x @ A.T``; the float weight is never materialised.

Every model-level function checks all its arguments and targets before it
changes anything: a failed call leaves the model as it was.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DtypeError, FormatError, ShapeError, ValueRangeError
from ..validation import FLOAT_DTYPES, check_dtype_arg, check_float
from .quant_linear import QuantLinear

_META_KEY = "pyquant.lora"  # safetensors metadata: per layer r, alpha, use_rslora


def check_lora_args(base, r, alpha, dropout, where: str = "LoRALinear") -> None:
    """The errors of LoRALinear(base, r, alpha, dropout), raised before anything is built."""
    if isinstance(base, LoRALinear):
        raise FormatError(f"{where}: the layer already has LoRA adapters (merge_lora first)")
    if not isinstance(base, (QuantLinear, nn.Linear)):
        raise FormatError(f"{where}: LoRA takes a QuantLinear or nn.Linear, got {type(base).__name__}")
    limit = min(base.in_features, base.out_features)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= limit:
        raise ValueRangeError(
            f"{where}: rank r={r!r} must be an int in [1, min(in_features={base.in_features}, "
            f"out_features={base.out_features})] = [1, {limit}]"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueRangeError(f"{where}: alpha={alpha!r} must be a finite number > 0")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueRangeError(f"{where}: dropout={dropout!r} must be a probability in [0, 1)")


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (as peft)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """``base(x) + scaling * dropout(x) @ lora_A.T @ lora_B.T`` around a frozen base.

    ``lora_A`` (r x in) starts Kaiming-uniform and ``lora_B`` (out x r) at zero,
    as in peft, so the model's output is unchanged at step 0. They are the only
    parameters that require grad (plus the base's bias with ``train_bias``);
    the packed base is buffers and gets neither grads nor optimizer state.
    ``dtype``: the adapters' dtype (default float32); the forward computes in
    the input's dtype, or the autocast dtype inside ``torch.autocast``.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: Optional[torch.dtype] = None, *, train_bias: bool = False):
        check_lora_args(base, r, alpha, dropout)
        if dtype is not None:
            check_dtype_arg("dtype", dtype)
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, bool(use_rslora)
        self.scaling = lora_scaling(r, alpha, self.use_rslora)
        self.train_bias = bool(train_bias) and base.bias is not None
        for name, p in base.named_parameters():
            p.requires_grad_(self.train_bias and name == "bias")
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        dtype = dtype or torch.float32
        self.lora_A = nn.Parameter(torch.empty((r, self.in_features), device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros((self.out_features, r), device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, self.base, self.lora_A, self.lora_B, self.scaling, self.lora_dropout)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` (out x in) in fp32: what the adapters add to the weight."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    @torch.no_grad()
    def merged(self, requantize: bool = True, method: str = "rtn", **options) -> nn.Module:
        """A new module computing this one's function with the adapters merged
        into the weight: a QuantLinear requantized into the base's format with
        ``method`` (``requantize``, QuantLinear bases), else an ``nn.Linear``."""
        base = self.base
        if isinstance(base, QuantLinear):
            w = base.dequantized_weight(torch.float32) + self.delta_weight()
            if requantize:
                from ..quantize import quantize_weight

                qw = quantize_weight(w, base.qformat, method, **options)
                return QuantLinear(qw, base.bias, kernel=base.kernel)
            dtype = torch.float32
        else:
            w = base.weight.float() + self.delta_weight()
            dtype = base.weight.dtype
        lin = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=w.device, dtype=dtype)
        lin.weight.copy_(w)
        if base.bias is not None:
            lin.bias.copy_(base.bias)
        return lin

    def extra_repr(self) -> str:
        p = 0.0 if self.lora_dropout is None else self.lora_dropout.p
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, dropout={p}, "
                f"rslora={self.use_rslora}, adapters={self.lora_A.dtype}")


def lora_linear(x: torch.Tensor, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                dropout: Optional[nn.Module] = None) -> torch.Tensor:
    """``base(x) + scaling * dropout(x) @ lora_A.T @ lora_B.T``: one fused op on
    a QuantLinear, torch's ops on an nn.Linear. Shared by LoRALinear and the
    peft layer (``pyquant.integrations.peft``)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise DtypeError(
            f"LoRA input x has dtype {got}; the adapters ({lora_A.dtype}) take "
            f"{', '.join(str(d) for d in FLOAT_DTYPES)} (inside torch.autocast: its dtype)"
        )
    if x.dim() == 0 or x.shape[-1] != base.in_features:
        raise ShapeError(f"LoRA input x has shape {tuple(x.shape)}; its last dim must be in_features={base.in_features}")
    dt = x.device.type
    dtype = torch.get_autocast_dtype(dt) if torch.is_autocast_enabled(dt) else x.dtype
    x, a, b = x.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
    # nn.Dropout is the identity in eval(); then the adapter path reads x itself
    x_lora = dropout(x) if dropout is not None and dropout.training else None
    if isinstance(base, QuantLinear):
        qdata = [getattr(base, name) for name in base._packed_names]
        y, _ = torch.ops.pyquant.lora_qmatmul(x, qdata, base._spec, base.out_features, base.in_features, base.bias,
                                              a, b, float(scaling), x_lora, base.kernel)
        return y
    bias = None if base.bias is None else base.bias.to(dtype)
    lowrank = F.linear(F.linear(x if x_lora is None else x_lora, a), b)
    return F.linear(x, base.weight.to(dtype), bias) + scaling * lowrank


# --- model-level functions -----------------------------------------------------------
def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _matches(name: str, key: str) -> bool:
    """peft's rule for a target_modules entry: the full name or its last components."""
    return name == key or name.endswith("." + key)


def _targets(model: nn.Module, target_modules) -> List[Tuple[str, nn.Module]]:
    named = [(n, m) for n, m in model.named_modules() if n]
    if target_modules is None:
        inside = {f"{n}.base" for n, m in named if isinstance(m, LoRALinear)}
        if inside:
            raise FormatError(f"add_lora: the model already has LoRA adapters (on {sorted(inside)[0][:-5]!r}, ...); "
                              "name the new targets with target_modules, or merge_lora first")
        found = [(n, m) for n, m in named if isinstance(m, QuantLinear)]
        if not found:
            raise FormatError("add_lora: the model has no QuantLinear layer; name nn.Linear targets with target_modules")
        return found
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        found = [(n, m) for n, m in named if pattern.fullmatch(n)]
        if not found:
            raise FormatError(f"add_lora: target_modules pattern {target_modules!r} matches no module name")
    else:
        keys = list(target_modules)
        if not keys or not all(isinstance(k, str) for k in keys):
            raise FormatError(f"add_lora: target_modules must be None, a regex or a list of names, got {target_modules!r}")
        found = []
        for key in keys:
            hits = [(n, m) for n, m in named if _matches(n, key)]
            if not hits:
                raise FormatError(f"add_lora: target_modules entry {key!r} matches no module of the model")
            found += [h for h in hits if h not in found]
    return found


def add_lora(model: nn.Module, r: int, alpha: float, target_modules: Union[None, str, Iterable[str]] = None,
             dropout: float = 0.0, use_rslora: bool = False, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Wrap the target layers of ``model`` in :class:`LoRALinear`, in place; returns ``model``.

    ``target_modules``: None (every QuantLinear), a list of names matched as
    peft does (a module's full name or its last dotted components, e.g.
    ``"q_proj"``), or a regex matched against full names. Every target must be
    a QuantLinear or nn.Linear and take the rank; otherwise nothing changes.
    As with peft, every other parameter of the model is frozen: only adapters train.
    """
    targets = _targets(model, target_modules)
    for name, mod in targets:
        check_lora_args(mod, r, alpha, dropout, where=f"add_lora: layer {name!r}")
    if dtype is not None:
        check_dtype_arg("dtype", dtype)
    new = [(name, LoRALinear(mod, r, alpha, dropout, use_rslora, dtype)) for name, mod in targets]
    for name, mod in new:
        _set_module(model, name, mod)
    adapters = {id(p) for _, layer in lora_layers(model, "add_lora")
                for p in layer.parameters() if p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)
    return model


def lora_layers(model: nn.Module, where: str) -> List[Tuple[str, LoRALinear]]:
    """Every LoRALinear of ``model`` by name; FormatError when there is none."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not found:
        raise FormatError(f"{where}: the model has no LoRA adapters (no LoRALinear module; see pyquant.add_lora)")
    return found


def merge_lora(model: nn.Module, requantize: bool = True, method: str = "rtn", **options) -> nn.Module:
    """Merge every adapter into its layer, in place; returns ``model``.

    Each LoRALinear becomes what it computes: dequantize, add ``scaling * B @
    A``, and (``requantize``) quantize again into the same format with
    ``method`` (a calibration-free method of ``pyquant.quantize_weight``; the
    packed weight does not record which method made it, so the default is
    round to nearest, ``"rtn"``); ``requantize=False`` leaves float
    ``nn.Linear`` layers. All merged layers are built before any is swapped in.
    """
    layers = lora_layers(model, "merge_lora")
    if requantize:
        from ..methods import get_method

        m = get_method(method)
        if m.needs_calibration:
            raise FormatError(f"merge_lora: method {m.name!r} needs calibration data; requantize with a "
                              "calibration-free method ('rtn', 'hqq', ...) or requantize=False")
        m.check_options(options, where="merge_lora")
    merged = [(name, layer.merged(requantize, method, **options)) for name, layer in layers]
    for name, mod in merged:
        _set_module(model, name, mod)
    return model


def _adapter_tensors(name: str, layer: LoRALinear) -> Dict[str, torch.Tensor]:
    prefix = f"{name}." if name else ""
    out = {prefix + "lora_A": layer.lora_A, prefix + "lora_B": layer.lora_B}
    if layer.train_bias:
        out[prefix + "bias"] = layer.base.bias
    return out


def _layer_config(layer: LoRALinear) -> dict:
    return {"r": layer.r, "alpha": layer.alpha, "use_rslora": layer.use_rslora}


def save_adapters(model: nn.Module, path: str) -> None:
    """The adapters of ``model`` (and trained biases) as a safetensors file:
    ``<layer>.lora_A``, ``<layer>.lora_B``; r, alpha and rsLoRA per layer in
    its metadata. The base weights are not saved."""
    from safetensors.torch import save_file

    layers = lora_layers(model, "save_adapters")
    tensors = {}
    for name, layer in layers:
        tensors.update({k: v.detach().cpu().contiguous() for k, v in _adapter_tensors(name, layer).items()})
    meta = {name: _layer_config(layer) for name, layer in layers}
    save_file(tensors, path, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})


def load_adapters(model: nn.Module, path: str) -> nn.Module:
    """Load adapters saved by :func:`save_adapters` into ``model``'s LoRALinear
    layers (add_lora first, with the same targets, r and alpha). Names, shapes
    and each layer's r/alpha/rsLoRA are checked before any value is copied."""
    from safetensors import SafetensorError, safe_open

    layers = lora_layers(model, "load_adapters")
    try:
        with safe_open(path, framework="pt") as f:
            saved = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except SafetensorError as exc:
        raise FormatError(f"load_adapters: {path} is not a readable safetensors file ({exc})") from None
    expected = {}
    for name, layer in layers:
        expected.update(_adapter_tensors(name, layer))
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise FormatError(f"load_adapters: {path} does not match the model's adapters: missing {missing[:4]}"
                          f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                          f"{' ...' if len(unexpected) > 4 else ''}")
    for key, param in expected.items():
        if tuple(saved[key].shape) != tuple(param.shape):
            raise ShapeError(f"load_adapters: {key} in {path} has shape {tuple(saved[key].shape)}, "
                             f"the model's is {tuple(param.shape)}")
        check_float(key, saved[key])
    configs = json.loads(meta.get(_META_KEY, "{}"))
    for name, layer in layers:
        cfg = configs.get(name)
        if cfg is not None and cfg != _layer_config(layer):
            raise ValueRangeError(f"load_adapters: layer {name!r} was saved with {cfg}, the model's has "
                                  f"{_layer_config(layer)} (add_lora with the saved r and alpha)")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(saved[key])
    return model
