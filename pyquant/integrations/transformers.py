"""Models into transformers: a llama-architecture GGUF file into ``transformers.LlamaForCausalLM``,
and any model the command line takes (``load_causal_lm``: a directory or a GGUF file).

    model, tokenizer = load_gguf_llama("SmolLM2-135M-Instruct.Q4_1.gguf")

(pyquant checkpoints reach ``from_pretrained`` through ``hf_quantizer.py``.)

The weights come from pyquant's own reader (:class:`pyquant.io.gguf.GGUFFile`)
and are dequantized tensor by tensor; the config is built from the GGUF
metadata; the tokenizer is transformers' own conversion of the GGUF vocabulary
(kept once converted: ``gguf_tokenizer.py``).
Nothing touches the network (``local_files_only=True``).
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re
from typing import Dict, Optional, Tuple

import torch

from ..errors import FormatError
from ..formats.base import QuantizedWeight
from ..io.gguf import GGUFFile
from .gguf_tokenizer import gguf_tokenizer

__all__ = ["load_gguf_llama", "load_gguf_llama_model", "llama_config_from_gguf", "load_gguf_weights", "hf_name",
           "load_causal_lm"]

# GGUF name inside block N -> transformers name inside model.layers.N
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_TOP_RE = re.compile(r"([a-z_]+)\.(weight|bias)")


def hf_name(gguf_name: str) -> Optional[str]:
    """The transformers parameter name of a llama GGUF tensor, or None if unknown."""
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{int(m.group(1))}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    m = _TOP_RE.fullmatch(gguf_name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def _dequant(qw: QuantizedWeight) -> torch.Tensor:
    """Dequantize one GGUF weight to float32 (N, K) with pyquant's own kernels
    (bit-exact with gguf-py by the format tests)."""
    from ..ops import dequantize

    return dequantize(qw, torch.float32)


def _unpermute_rope_rows(w: torch.Tensor, n_heads: int, what: str) -> torch.Tensor:
    """Undo llama.cpp's reordering of q_proj/k_proj output rows.

    llama.cpp's default rope rotates adjacent pairs (x[2j], x[2j+1]) of each head,
    transformers' rotate_half pairs x[j] with x[j + head_dim/2]. The converter
    therefore stores, within each head, row j of the first half and row j of the
    second half next to each other (rows 2j and 2j+1). Reading each head as
    (head_dim/2, 2) and swapping those axes restores the half-split order.
    """
    rows = w.shape[0]
    if n_heads < 1 or rows % (2 * n_heads):
        raise FormatError(f"{what}: {rows} rows cannot be split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _meta(md: Dict, key: str, kind=int, default=None, required=True):
    if key not in md:
        if required and default is None:
            raise FormatError(f"GGUF metadata has no {key!r}, needed for the llama config")
        return default
    value = md[key]
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise FormatError(f"GGUF metadata {key!r} should be an integer, got {value!r}")
    if kind is float and not isinstance(value, (int, float)):
        raise FormatError(f"GGUF metadata {key!r} should be a number, got {value!r}")
    return kind(value)


def llama_config_from_gguf(f: GGUFFile, dtype: torch.dtype = torch.float32):
    """A ``transformers.LlamaConfig`` from the metadata of an open llama GGUF file."""
    from transformers import LlamaConfig

    md = f.metadata
    arch = md.get("general.architecture")
    if arch != "llama":
        raise FormatError(f"{f.path}: general.architecture is {arch!r}; load_gguf_llama handles 'llama' only")
    a = arch + "."
    hidden = _meta(md, a + "embedding_length")
    n_heads = _meta(md, a + "attention.head_count")
    n_kv = _meta(md, a + "attention.head_count_kv", default=n_heads)
    if n_heads < 1 or n_kv < 1 or n_heads % n_kv:
        raise FormatError(f"{f.path}: head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
    head_dim = _meta(md, a + "attention.key_length", required=False)
    if head_dim is None:
        head_dim = _meta(md, a + "rope.dimension_count", required=False)
    if head_dim is None:
        head_dim = hidden // n_heads
    rope_dim = _meta(md, a + "rope.dimension_count", default=head_dim)
    if rope_dim != head_dim:
        raise FormatError(f"{f.path}: partial rotary (rope dims {rope_dim} < head dim {head_dim}) is not supported")
    if "rope_freqs.weight" in f:
        raise FormatError(f"{f.path}: per-frequency rope factors (rope_freqs.weight, Llama 3.1 style) are not supported")

    tokens = md.get("tokenizer.ggml.tokens")
    vocab = _meta(md, a + "vocab_size", required=False)
    if vocab is None:
        vocab = len(tokens) if isinstance(tokens, list) else f.tensor_info("token_embd.weight").dims[1]

    theta = _meta(md, a + "rope.freq_base", float, default=10000.0)
    rope = {"rope_type": "default", "rope_theta": theta}
    scaling = md.get(a + "rope.scaling.type", "none")
    if scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": theta, "factor": _meta(md, a + "rope.scaling.factor", float)}
    elif scaling != "none":
        raise FormatError(f"{f.path}: rope scaling {scaling!r} is not supported")

    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_meta(md, a + "feed_forward_length"),
        num_hidden_layers=_meta(md, a + "block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=_meta(md, a + "context_length", default=2048),
        rms_norm_eps=_meta(md, a + "attention.layer_norm_rms_epsilon", float, default=1e-5),
        tie_word_embeddings="output.weight" not in f,
        attention_bias="blk.0.attn_q.bias" in f,
        mlp_bias=False,
    )
    for gkey, ckey in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        tid = md.get(f"tokenizer.ggml.{gkey}_token_id")
        if isinstance(tid, int):
            kwargs[ckey] = tid
    params = inspect.signature(LlamaConfig.__init__).parameters
    if "rope_parameters" in params:  # transformers >= 5
        kwargs["rope_parameters"] = rope
        kwargs["dtype"] = dtype
    else:
        kwargs["rope_theta"] = theta
        if rope["rope_type"] != "default":
            kwargs["rope_scaling"] = {"type": rope["rope_type"], "factor": rope["factor"]}
        kwargs["torch_dtype"] = dtype
    return LlamaConfig(**kwargs)


def _no_init():
    """Skip the random init of weights that are overwritten right away."""
    for modname in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            mod = __import__(modname, fromlist=["no_init_weights"])
        except ImportError:
            continue
        if hasattr(mod, "no_init_weights"):
            return mod.no_init_weights()
    return contextlib.nullcontext()


def load_gguf_weights(model, f: GGUFFile, dtype: torch.dtype = torch.float32) -> None:
    """Fill every parameter of a LlamaForCausalLM from a llama GGUF file."""
    cfg = model.config
    params = dict(model.named_parameters())  # tied lm_head shows up once, as embed_tokens
    filled = set()
    unknown = []
    for name in f.tensor_names():
        target = hf_name(name)
        if target is None or target not in params:
            unknown.append(name)
            continue
        t = f.tensor(name)
        w = _dequant(t) if isinstance(t, QuantizedWeight) else t.float()
        p = params[target]
        if tuple(w.shape) != tuple(p.shape):
            raise FormatError(
                f"{f.path}: tensor {name!r} has shape {tuple(w.shape)} but {target} needs {tuple(p.shape)} "
                f"for this config"
            )
        if ".attn_q." in name:
            w = _unpermute_rope_rows(w, cfg.num_attention_heads, name)
        elif ".attn_k." in name:
            w = _unpermute_rope_rows(w, cfg.num_key_value_heads, name)
        with torch.no_grad():
            p.copy_(w.to(dtype))
        filled.add(target)
    if unknown:
        raise FormatError(f"{f.path}: tensors with no place in LlamaForCausalLM: {unknown[:8]}")
    missing = [n for n in params if n not in filled]
    if cfg.tie_word_embeddings and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")  # shared with embed_tokens, tied by the caller
    if missing:
        raise FormatError(f"{f.path}: no GGUF tensor for {missing[:8]}")


def load_gguf_llama_model(path, dtype: torch.dtype = torch.float32):
    """The ``LlamaForCausalLM`` of a llama GGUF file (no tokenizer), in eval mode."""
    from transformers import LlamaForCausalLM

    with GGUFFile(path) as f:
        config = llama_config_from_gguf(f, dtype)
        with _no_init():
            model = LlamaForCausalLM(config)
        model.to(dtype)
        load_gguf_weights(model, f, dtype)
    if config.tie_word_embeddings:
        model.tie_weights()
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            raise RuntimeError("transformers did not tie lm_head to embed_tokens")
    return model.eval()


def load_gguf_llama(path, dtype: torch.dtype = torch.float32) -> Tuple["torch.nn.Module", object]:
    """``(LlamaForCausalLM, tokenizer)`` from a llama GGUF file, model in eval mode.

    Weights are read and dequantized by pyquant; the tokenizer is
    ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` (transformers converts
    the GGUF vocabulary; needs the ``gguf`` package), kept converted after the
    first time (:mod:`pyquant.integrations.gguf_tokenizer`). Local files only.
    """
    path = os.fspath(path)
    model = load_gguf_llama_model(path, dtype)
    return model, gguf_tokenizer(path)


def load_causal_lm(path, dtype: torch.dtype = torch.float32) -> Tuple["torch.nn.Module", object]:
    """``(model, tokenizer or None)`` from a transformers model directory (pyquant
    checkpoints included: their layers stay packed) or a GGUF file, in eval mode.

    A llama GGUF file goes through pyquant's own reader (:func:`load_gguf_llama`);
    any other architecture through transformers' GGUF support, which names the
    architectures it cannot read. Local files only.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise FormatError(f"{path}: a model is a transformers directory or a .gguf file")
        with GGUFFile(path) as f:
            arch = f.metadata.get("general.architecture")
        if arch == "llama":
            return load_gguf_llama(path, dtype)
        folder, name = os.path.split(os.path.abspath(path))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, local_files_only=True)
        return model.eval(), gguf_tokenizer(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FormatError(f"{path}: no config.json: not a transformers model directory")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError):  # a directory may hold weights only
        tokenizer = None
    return model.eval(), tokenizer
