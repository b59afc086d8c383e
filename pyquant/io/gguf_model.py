"""Llama-family models to and from GGUF files, quantized weights kept quantized.

    model = load_gguf_quantized("SmolLM2-135M-Instruct.Q4_1.gguf")    # QuantLinear(GGUF(...)) layers
    export_gguf(model, "model-q4_k.gguf", tokenizer=tok)                # what llama.cpp runs

Reading: every linear weight stored in a block type pyquant has a format for
(Q4_0 ... Q8_0, Q2_K ... Q6_K) becomes a ``QuantLinear`` holding the file's
block bytes unchanged; dense linear weights stay ``nn.Linear``; the token
embedding and the norms are dequantized to ``dtype`` (they are not matmuls).
llama.cpp stores the rows of ``attn_q`` / ``attn_k`` in its rope order; the
permutation back to transformers' order moves whole rows, so it is applied to
the block rows themselves and nothing is requantized.

Writing: the metadata llama.cpp needs for the ``llama`` architecture
(hyperparameters, rope, norms), the tokenizer (converted from a transformers
byte-level BPE tokenizer, or copied with its types from another GGUF file) and
every tensor: GGUF-format layers as their blocks, Int layers that a legacy
block type holds exactly (4-bit group-32 symmetric fp16 -> Q4_0, 8-bit ->
Q8_0, 4-bit asymmetric -> Q4_1 when ``-scale * zero`` is an fp16 value),
float linears and embeddings in their dtype, norms in F32.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..errors import FormatError
from ..formats import GGUF, Int, QuantizedWeight
from ..integrations.transformers import (
    _BLOCK_NAMES,
    _TOP_NAMES,
    _no_init,
    _unpermute_rope_rows,
    hf_name,
    llama_config_from_gguf,
)
from ..nn import QuantLinear
from ..formats.gguf import BLOCK_TYPES
from .gguf import _DENSE as DENSE_TYPES
from .gguf import GGUFFile, ValueType
from .gguf_writer import write_gguf
from .files import atomic_output
from .hf_model import install

__all__ = ["load_gguf_quantized", "export_gguf", "gguf_tensor_name", "int_to_gguf", "tokenizer_metadata"]

# llama.cpp's llama_ftype for a file whose weights are mostly of one type (a label only).
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
              "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "BF16": 32}
# llama.cpp's token types
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5
_HF_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


# --- reading ---------------------------------------------------------------------------------
def _dequantize(qw: QuantizedWeight) -> torch.Tensor:
    from ..ops import dequantize

    return dequantize(qw, torch.float32)


def _rows(t, fn):
    """Apply a row permutation ``fn`` to a dense tensor or to a GGUF weight's block rows."""
    if isinstance(t, QuantizedWeight):
        return QuantizedWeight(t.format, {"blocks": fn(t.tensors["blocks"]).contiguous()}, t.shape)
    return fn(t)


def load_gguf_quantized(path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``LlamaForCausalLM`` (eval mode) whose linear layers hold the GGUF file's quantized blocks."""
    from transformers import LlamaForCausalLM

    path = os.fspath(path)
    with GGUFFile(path) as f:
        config = llama_config_from_gguf(f, dtype)
        _check_shapes(f, config)
        with _no_init():
            model = LlamaForCausalLM(config).to(dtype)
        modules = dict(model.named_modules())
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
        quantized: Dict[str, QuantizedWeight] = {}
        dense: Dict[str, torch.Tensor] = {}
        for name in f.tensor_names():
            target = hf_name(name)
            t = f.tensor(name)  # raises, naming the tensor, for types pyquant has no format for
            kind = name.split(".")[2] if name.startswith("blk.") else None
            if kind in heads:
                t = _rows(t, lambda w, h=heads[kind], n=name: _unpermute_rope_rows(w, h, n))
            module_name, _, param = target.rpartition(".")
            if isinstance(t, QuantizedWeight) and param == "weight" and isinstance(modules.get(module_name), nn.Linear):
                quantized[module_name] = t
            else:
                dense[target] = _dequantize(t) if isinstance(t, QuantizedWeight) else t
    layers = {name: (qw, dense.pop(f"{name}.bias", None)) for name, qw in quantized.items()}
    return install(model, layers, dense, path)


def _check_shapes(f: GGUFFile, config) -> None:
    """Every parameter the metadata's config implies has a tensor of that shape in the file.

    Checked on a meta-device skeleton (no memory) before the real model is
    built, so hyperparameters in the header cannot make the loader allocate
    more than the file's own tensors.
    """
    from transformers import LlamaForCausalLM

    blocks = {int(n.split(".")[1]) for n in f.tensor_names() if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if blocks != set(range(config.num_hidden_layers)):
        raise FormatError(
            f"{f.path}: block_count {config.num_hidden_layers} disagrees with the tensors' blocks "
            f"({len(blocks)} blocks, numbered up to {max(blocks, default=-1)})"
        )
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    expected = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    found = set()
    for name in f.tensor_names():
        target = hf_name(name)
        if target is None or target not in expected:
            raise FormatError(f"{f.path}: tensor {name!r} has no place in LlamaForCausalLM for this config")
        info = f.tensor_info(name)
        if info.type_name not in BLOCK_TYPES and info.type_name not in DENSE_TYPES:
            raise FormatError(f"{f.path}: tensor {name!r} has ggml type {info.type_name}, which pyquant has no format for")
        shape = info.shape
        if shape != expected[target]:
            raise FormatError(f"{f.path}: tensor {name!r} has shape {shape}, the metadata's config needs {expected[target]}")
        found.add(target)
    missing = [n for n in expected if n not in found and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise FormatError(f"{f.path}: no GGUF tensor for {missing[:8]}")


# --- writing ---------------------------------------------------------------------------------
_GGUF_BLOCK = {hf: gguf for gguf, hf in _BLOCK_NAMES.items()}
_GGUF_TOP = {hf: gguf for gguf, hf in _TOP_NAMES.items()}


def gguf_tensor_name(hf_param: str) -> Optional[str]:
    """The llama GGUF name of a transformers Llama parameter (inverse of ``hf_name``)."""
    m = _HF_BLOCK_RE.fullmatch(hf_param)
    if m and m.group(2) in _GGUF_BLOCK:
        return f"blk.{int(m.group(1))}.{_GGUF_BLOCK[m.group(2)]}.{m.group(3)}"
    module, _, kind = hf_param.rpartition(".")
    if module in _GGUF_TOP:
        return f"{_GGUF_TOP[module]}.{kind}"
    return None


def _permute_rope_rows(w: torch.Tensor, n_heads: int, what: str) -> torch.Tensor:
    """transformers' half-split rows -> llama.cpp's interleaved rope rows (inverse of ``_unpermute_rope_rows``)."""
    rows = w.shape[0]
    if n_heads < 1 or rows % (2 * n_heads):
        raise FormatError(f"{what}: {rows} rows cannot be split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def int_to_gguf(qw: QuantizedWeight) -> QuantizedWeight:
    """An Int weight as the legacy GGUF block type that holds it exactly, or FormatError."""
    fmt = qw.format
    n, k = qw.shape
    hint = "quantize with a GGUF method (q4_k, q6_k, ...) or Int 4/8-bit, group 32, fp16 scales"
    if fmt.group_size != 32 or fmt.act_order or fmt.scale_dtype != torch.float16 or fmt.bits not in (4, 8):
        raise FormatError(f"{fmt.spec()} has no exact GGUF block type: {hint}")
    codes, scales, zeros = fmt.unpack(qw)
    if fmt.symmetric:
        if fmt.bits == 4:
            return GGUF("Q4_0").pack(codes, scales)
        return GGUF("Q8_0").pack(codes.to(torch.int16) - 128, scales)
    if fmt.bits != 4:
        raise FormatError(f"{fmt.spec()}: 8-bit weights with zero points have no GGUF block type: {hint}")
    zf = zeros.to(torch.float32)
    m = -(scales.to(torch.float32) * zf)
    if not torch.equal(zf, zf.round()) or not torch.equal(m.to(torch.float16).to(torch.float32), m):
        raise FormatError(f"{fmt.spec()}: Q4_1's min -scale*zero is not an fp16 value for every group: {hint}")
    return GGUF("Q4_1").pack(codes, scales, m.to(torch.float16))


def _linear_tensor(name: str, mod: nn.Module):
    if isinstance(mod, QuantLinear):
        qw = mod.quantized_weight.cpu()
        if isinstance(qw.format, GGUF):
            return qw
        if isinstance(qw.format, Int):
            try:
                return int_to_gguf(qw)
            except FormatError as exc:
                raise FormatError(f"layer {name!r}: {exc}") from None
        raise FormatError(f"layer {name!r}: {qw.format.spec()} has no GGUF block type; quantize with a GGUF method")
    return mod.weight.detach()


def _hyperparameters(config) -> Dict[str, Any]:
    if getattr(config, "model_type", None) != "llama":
        raise FormatError(
            f"GGUF export writes the llama architecture; this model is {getattr(config, 'model_type', None)!r}"
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    md = {
        "llama.context_length": int(config.max_position_embeddings),
        "llama.embedding_length": int(config.hidden_size),
        "llama.block_count": int(config.num_hidden_layers),
        "llama.feed_forward_length": int(config.intermediate_size),
        "llama.attention.head_count": int(heads),
        "llama.attention.head_count_kv": int(config.num_key_value_heads or heads),
        "llama.rope.freq_base": float(theta),
        "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "llama.rope.dimension_count": int(head_dim),
        "llama.vocab_size": int(config.vocab_size),
    }
    if head_dim != config.hidden_size // heads:
        md["llama.attention.key_length"] = int(head_dim)
        md["llama.attention.value_length"] = int(head_dim)
    if rope_type == "linear":
        md["llama.rope.scaling.type"] = "linear"
        md["llama.rope.scaling.factor"] = float(rope["factor"])
    elif rope_type != "default":
        raise FormatError(f"GGUF export: rope type {rope_type!r} is not supported (default and linear are)")
    if getattr(config, "mlp_bias", False):
        raise FormatError("GGUF export: llama models with MLP biases are not supported")
    return md


def tokenizer_metadata(tokenizer, vocab_size: int, pre: str = "default") -> Dict[str, Any]:
    """GGUF ``tokenizer.*`` metadata ("gpt2" model) from a transformers byte-level BPE fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise FormatError("GGUF export converts fast (tokenizers-backed) byte-level BPE tokenizers only")
    model = json.loads(backend.to_str()).get("model", {})
    if model.get("type") != "BPE":
        raise FormatError(f"GGUF export converts BPE tokenizers; this one is {model.get('type')!r}")
    vocab = tokenizer.get_vocab()
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [_UNUSED] * size
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, _NORMAL
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if i < size:
            types[i] = _CONTROL if getattr(added, "special", False) else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    md: Dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    for attr, key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("unk_token_id", "unknown"),
                      ("pad_token_id", "padding")):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int):
            md[f"tokenizer.ggml.{key}_token_id"] = tid
    md["tokenizer.ggml.add_bos_token"] = bool(getattr(tokenizer, "add_bos_token", False))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        md["tokenizer.chat_template"] = template
    return md


_TOKENIZER_TYPES = {"tokenizer.ggml.token_type": (ValueType.ARRAY, ValueType.INT32),
                    "tokenizer.ggml.scores": (ValueType.ARRAY, ValueType.FLOAT32)}


def _model_tensors(model: nn.Module) -> Dict[str, Any]:
    config = model.config
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    tied = getattr(config, "tie_word_embeddings", False)
    out: Dict[str, Any] = {}
    for mod_name, mod in model.named_modules():
        params = {}
        if isinstance(mod, (QuantLinear, nn.Linear)):
            params["weight"] = _linear_tensor(mod_name, mod)
            if mod.bias is not None:
                params["bias"] = mod.bias.detach()
        else:
            params = {p: t.detach() for p, t in mod.named_parameters(recurse=False)}
        for pname, t in params.items():
            hf = f"{mod_name}.{pname}"
            name = gguf_tensor_name(hf)
            if name is None:
                raise FormatError(f"parameter {hf!r} has no llama GGUF name")
            if name == "output.weight" and tied:
                continue
            kind = name.split(".")[2] if name.startswith("blk.") else None
            if kind in heads:
                t = _rows(t, lambda w, h=heads[kind], n=hf: _permute_rope_rows(w, h, n))
            if isinstance(t, torch.Tensor) and (t.dim() == 1 or "norm" in name):
                t = t.to(torch.float32)  # llama.cpp keeps norms and biases in F32
            out[name] = t
    return out


def export_gguf(
    model: nn.Module,
    out,
    tokenizer=None,
    tokenizer_gguf=None,
    tokenizer_pre: str = "default",
    name: Optional[str] = None,
    overwrite: bool = False,
) -> str:
    """Write a llama-architecture GGUF file of ``model``. Returns its path.

    ``out`` ending in ``.gguf`` is the file; otherwise a directory holding
    ``model.gguf`` (and the tokenizer's files when ``tokenizer`` is given).
    The vocabulary comes from ``tokenizer`` (a transformers byte-level BPE
    tokenizer; ``tokenizer_pre`` names llama.cpp's pre-tokenizer) or is copied
    from the GGUF file ``tokenizer_gguf``; one of them is required, since
    llama.cpp cannot run a model without its vocabulary.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise FormatError(f"{type(model).__name__} has no transformers config: GGUF export needs its hyperparameters")
    metadata: Dict[str, Any] = {"general.architecture": "llama",
                                "general.name": name or getattr(config, "_name_or_path", "") or "model"}
    metadata.update(_hyperparameters(config))
    tensors = _model_tensors(model)
    counts: Dict[str, int] = {}
    for t in tensors.values():
        if isinstance(t, QuantizedWeight):
            counts[t.format.type] = counts.get(t.format.type, 0) + 1
    main = max(counts, key=counts.get) if counts else "F32"
    metadata["general.file_type"] = _FILE_TYPE.get(main, 0)
    metadata["general.quantization_version"] = 2
    types: Dict[str, Any] = {}
    if tokenizer_gguf is not None:
        with GGUFFile(tokenizer_gguf) as src:
            for key, value in src.metadata.items():
                if key.startswith("tokenizer."):
                    metadata[key] = value
                    types[key] = src.metadata_types[key]
    elif tokenizer is not None:
        metadata.update(tokenizer_metadata(tokenizer, int(config.vocab_size), tokenizer_pre))
        types.update(_TOKENIZER_TYPES)
    else:
        raise FormatError("GGUF export needs the vocabulary: pass tokenizer= or tokenizer_gguf=")
    out = os.fspath(out)
    if out.endswith(".gguf"):
        return write_gguf(out, metadata, tensors, types, overwrite=overwrite)
    with atomic_output(out, overwrite=overwrite) as tmp:
        write_gguf(os.path.join(tmp, "model.gguf"), metadata, tensors, types)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return os.path.join(os.path.abspath(out), "model.gguf")

