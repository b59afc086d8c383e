"""Lossless conversion between bitsandbytes 4-bit NF4 weights and pyquant.

bitsandbytes keeps a 4-bit weight as a packed uint8 tensor ``((N*K+1)//2, 1)``
(or the same bytes viewed as another ``quant_storage`` dtype) plus a
``QuantState``. The bytes are pyquant's NF4 ``qweight`` unchanged: flat
row-major, blocks of ``blocksize`` that may span rows, first value in the high
nibble. The statistics map one to one:

===============================  =================================
bitsandbytes ``QuantState``      pyquant ``NF4`` tensors
===============================  =================================
``absmax`` fp32 (not nested)     ``absmax``
``absmax`` uint8 (nested)        ``absmax_q``
``state2.absmax`` fp32           ``absmax_scale`` (blocks of 256)
``offset`` fp32 scalar           ``absmax_offset`` (shape (1,))
``code`` / ``state2.code``       fixed: NF4 codebook / signed dynamic map
===============================  =================================

so ``from_bnb`` and ``to_bnb`` copy tensors and check the parts pyquant does
not store (quant type, code books, nested block size) instead of converting.
``from_bnb`` needs no bitsandbytes install; ``to_bnb`` builds a real
``bitsandbytes.functional.QuantState`` and does.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..errors import DtypeError, FormatError, ShapeError
from ..formats import NF4, QuantizedWeight
from ..formats.nf4 import NESTED_BLOCK_SIZE
from ..formats.nf4 import dynamic_map, nf4_codebook

_PACKED_KEY_SUFFIX = "bitsandbytes__nf4"
_MAX_JSON_BYTES = 1 << 16  # the real entry is under 200 bytes


def _state_from_dict(d: Mapping[str, Any]) -> SimpleNamespace:
    """A QuantState-like namespace from ``QuantState.as_dict()`` output or the
    ``weight.*`` entries of a bitsandbytes state dict (prefixes are ignored)."""
    flat = {}
    for key, value in d.items():
        name = key.split(".")[-1]
        if name == _PACKED_KEY_SUFFIX or name.startswith("bitsandbytes__"):
            if name != _PACKED_KEY_SUFFIX:
                raise FormatError(f"quant state entry {key!r} is not NF4 (only {_PACKED_KEY_SUFFIX!r} converts)")
            if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.numel() > _MAX_JSON_BYTES:
                raise FormatError(f"quant state entry {key!r} must be a uint8 JSON string of at most {_MAX_JSON_BYTES} bytes")
            try:
                packed = json.loads(bytes(value.cpu().reshape(-1).tolist()).decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise FormatError(f"quant state entry {key!r} is not valid JSON: {exc}") from None
            if not isinstance(packed, dict):
                raise FormatError(f"quant state entry {key!r} must hold a JSON object")
            flat.update(packed)
        else:
            flat[name] = value
    for req in ("quant_type", "absmax", "blocksize"):
        if req not in flat:
            raise FormatError(f"bitsandbytes quant state has no {req!r} entry (keys: {sorted(flat)})")
    state2 = None
    offset = None
    if "nested_absmax" in flat:
        for req in ("nested_blocksize", "nested_offset"):
            if req not in flat:
                raise FormatError(f"nested bitsandbytes quant state has no {req!r} entry")
        state2 = SimpleNamespace(
            absmax=flat["nested_absmax"],
            blocksize=flat["nested_blocksize"],
            code=flat.get("nested_quant_map"),
        )
        offset = flat["nested_offset"]
    return SimpleNamespace(
        quant_type=flat["quant_type"],
        absmax=flat["absmax"],
        blocksize=flat["blocksize"],
        code=flat.get("quant_map"),
        shape=flat.get("shape"),
        state2=state2,
        offset=offset,
        nested=state2 is not None,
    )


def _as_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"bitsandbytes quant state {name} must be a tensor, got {type(t).__name__}")
    return t


def from_bnb(packed: torch.Tensor, quant_state, shape: Optional[Tuple[int, int]] = None) -> QuantizedWeight:
    """A pyquant NF4 :class:`QuantizedWeight` from a bitsandbytes 4-bit weight.

    ``packed``: the packed tensor (``Params4bit.data`` or the ``weight`` entry of
    a state dict), any ``quant_storage`` dtype. ``quant_state``: a
    ``bitsandbytes.functional.QuantState`` or a dict (``QuantState.as_dict()``
    or the ``weight.*`` state-dict entries). ``shape``: ``(out_features,
    in_features)``; defaults to ``quant_state.shape``.
    """
    if not isinstance(packed, torch.Tensor):
        raise DtypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    qs = _state_from_dict(quant_state) if isinstance(quant_state, Mapping) else quant_state
    quant_type = getattr(qs, "quant_type", None)
    if quant_type != "nf4":
        raise FormatError(f"only bitsandbytes quant_type 'nf4' converts to pyquant NF4, got {quant_type!r}")

    qs_shape = getattr(qs, "shape", None)
    if shape is None:
        if qs_shape is None:
            raise ShapeError("quant_state has no shape; pass shape=(out_features, in_features)")
        qs_shape = tuple(int(v) for v in qs_shape)
        if len(qs_shape) == 1:
            qs_shape = (1, qs_shape[0])
        if len(qs_shape) != 2:
            raise ShapeError(f"quant_state.shape {qs_shape} is not 2-D; pass shape=(out_features, in_features)")
        shape = qs_shape
    shape = tuple(int(v) for v in shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ShapeError(f"shape must be (out_features>=1, in_features>=1), got {shape}")
    numel = shape[0] * shape[1]
    if qs_shape is not None and math.prod(int(v) for v in qs_shape) != numel:
        raise ShapeError(f"shape {shape} has {numel} values but quant_state.shape {tuple(qs_shape)} does not")

    blocksize = getattr(qs, "blocksize", None)
    fmt = NF4(block_size=blocksize, double_quant=getattr(qs, "state2", None) is not None)
    nb = fmt.num_blocks(shape)

    code = getattr(qs, "code", None)
    if code is not None and not torch.equal(_as_tensor("code", code).detach().float().cpu(), nf4_codebook()):
        raise FormatError("quant_state.code is not the standard NF4 codebook; pyquant NF4 cannot represent it")

    data = packed.detach().contiguous()
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    data = data.reshape(-1)
    if data.numel() != (numel + 1) // 2:
        raise ShapeError(
            f"packed weight holds {data.numel()} bytes; shape {shape} ({numel} values) needs {(numel + 1) // 2}"
        )

    absmax = _as_tensor("absmax", qs.absmax).detach().reshape(-1)
    if absmax.numel() != nb:
        raise ShapeError(f"quant_state.absmax has {absmax.numel()} values; {nb} blocks of {fmt.block_size} expected")
    tensors = {"qweight": data}
    if fmt.double_quant:
        st2 = qs.state2
        if int(st2.blocksize) != NESTED_BLOCK_SIZE:
            raise FormatError(f"nested absmax block size must be {NESTED_BLOCK_SIZE}, got {st2.blocksize}")
        code2 = getattr(st2, "code", None)
        code2 = None if code2 is None else _as_tensor("state2.code", code2).detach().float().cpu()
        if code2 is not None and not torch.equal(code2, dynamic_map()):
            raise FormatError("quant_state.state2.code is not bitsandbytes' signed dynamic map")
        if absmax.dtype != torch.uint8:
            raise DtypeError(f"nested quant_state.absmax must be uint8 codes, got {absmax.dtype}")
        offset = qs.offset
        offset = offset.detach() if isinstance(offset, torch.Tensor) else torch.tensor(float(offset))
        tensors["absmax_q"] = absmax
        tensors["absmax_scale"] = _as_tensor("state2.absmax", st2.absmax).detach().reshape(-1).to(torch.float32)
        tensors["absmax_offset"] = offset.reshape(1).to(torch.float32).to(data.device)
    else:
        if not absmax.dtype.is_floating_point:
            raise DtypeError(f"quant_state.absmax must be floating point, got {absmax.dtype}")
        # bitsandbytes computes with absmax.float(): widening keeps the values.
        tensors["absmax"] = absmax.to(torch.float32)
    return QuantizedWeight(fmt, tensors, shape)


def to_bnb(qw: QuantizedWeight, dtype: torch.dtype = torch.float32):
    """``(packed, QuantState)`` for bitsandbytes: ``packed`` is uint8
    ``((N*K+1)//2, 1)``, the layout of ``bitsandbytes.functional.quantize_4bit``.
    ``dtype`` is the dtype bitsandbytes dequantizes to (the original weight's).
    """
    if not isinstance(qw, QuantizedWeight):
        raise FormatError(f"expected a pyquant QuantizedWeight, got {type(qw).__name__}")
    fmt = qw.format
    if not isinstance(fmt, NF4):
        raise FormatError(f"only NF4 weights convert to bitsandbytes, got {fmt.spec()}")
    try:
        from bitsandbytes.functional import QuantState
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(f"to_bnb needs bitsandbytes ({exc})") from None
    t = qw.tensors
    device = qw.device
    packed = t["qweight"].reshape(-1, 1).clone()
    code = nf4_codebook(device).clone()
    common = dict(shape=torch.Size(qw.shape), code=code, blocksize=fmt.block_size, quant_type="nf4", dtype=dtype)
    if fmt.double_quant:
        state2 = QuantState(
            absmax=t["absmax_scale"].clone(),
            code=dynamic_map(device).clone(),
            blocksize=NESTED_BLOCK_SIZE,
            dtype=torch.float32,
        )
        state = QuantState(
            absmax=t["absmax_q"].clone(), offset=t["absmax_offset"].reshape(()).clone(), state2=state2, **common
        )
    else:
        state = QuantState(absmax=t["absmax"].clone(), **common)
    return packed, state


# --- one Linear4bit of a state dict ------------------------------------------------------
LAYER_MARKER = "weight.quant_state.bitsandbytes__nf4"


def import_layer(state: Mapping[str, torch.Tensor]) -> QuantizedWeight:
    """An NF4 QuantizedWeight from one ``Linear4bit``'s state dict entries (``weight``,
    ``weight.absmax``, ..., ``weight.quant_state.bitsandbytes__nf4``; names without the layer prefix)."""
    if "weight" not in state:
        raise FormatError(f"bitsandbytes layer state has no 'weight' entry (has {sorted(state)})")
    for key in state:
        if key.startswith("weight.quant_state.bitsandbytes__") and key != LAYER_MARKER:
            raise FormatError(f"{key!r}: only bitsandbytes' nf4 quant type converts to pyquant NF4")
    quant_state = {k: v for k, v in state.items() if k.startswith("weight.")}
    return from_bnb(state["weight"], quant_state)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def export_layer(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """One ``Linear4bit``'s state dict entries (what ``QuantState.as_dict(packed=True)`` gives, plus
    ``weight``) for an NF4 weight; needs no bitsandbytes install. ``dtype``: the weight's float dtype."""
    if not isinstance(qw, QuantizedWeight) or not isinstance(qw.format, NF4):
        spec = qw.format.spec() if isinstance(qw, QuantizedWeight) else type(qw).__name__
        raise FormatError(f"only NF4 weights convert to bitsandbytes, got {spec}")
    fmt, t = qw.format, qw.tensors
    out = {"weight": t["qweight"].reshape(-1, 1).clone()}
    meta = {"quant_type": "nf4", "blocksize": fmt.block_size, "dtype": _dtype_name(dtype), "shape": list(qw.shape)}
    if fmt.double_quant:
        out["weight.absmax"] = t["absmax_q"].clone()
        out["weight.quant_map"] = nf4_codebook().clone()
        out["weight.nested_absmax"] = t["absmax_scale"].clone()
        out["weight.nested_quant_map"] = dynamic_map().clone()
        meta.update(
            nested_blocksize=NESTED_BLOCK_SIZE, nested_dtype="float32", nested_offset=float(t["absmax_offset"].item())
        )
    else:
        out["weight.absmax"] = t["absmax"].clone()
        out["weight.quant_map"] = nf4_codebook().clone()
    out[LAYER_MARKER] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return out


def quantization_config(fmt: NF4, compute_dtype: torch.dtype, skip: list) -> Dict:
    """The ``quantization_config`` transformers' BitsAndBytesConfig reads for an NF4 model."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": fmt.double_quant,
        "bnb_4bit_compute_dtype": _dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": sorted(skip) or None,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }
