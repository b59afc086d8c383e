"""Model-family adapters: for each decoder family pyquant claims, which linear
layers' input scale (AWQ) folds into which producer, and which layers AWQ does
not clip.

An adapter names modules relative to a decoder block. Its rules are what the
family's code does (read from transformers' modeling files), not guesses from
layer names; even so, every fold is checked numerically before it is kept
(``pyquant.pipeline.folds``), and how a norm applies its weight is probed, not
assumed (``pyquant.algorithms.awq_fold.probe_norm``).

Families are recognised by ``model.config.model_type``. A model without an
adapter still quantizes with every method; AWQ then folds only into producers
it finds by running the block (the module whose output the group reads) and
verifies, or refuses the model with ``awq_strict_folds=True``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple

from torch import nn

from ..errors import FormatError


@dataclasses.dataclass(frozen=True)
class FoldRule:
    """The linears ``consumers`` read the output of ``producer`` (a norm or a linear)."""

    consumers: Tuple[str, ...]
    producer: str
    # A fused producer: (block -> (start, stop)) of its output rows that the consumers read.
    rows: Optional[Callable[[nn.Module], Tuple[int, int]]] = None
    # The consumers read attention over the producer's value rows: the path of the attention
    # module, whose heads tie the scale (grouped-query attention).
    heads: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Adapter:
    family: str
    rules: Tuple[FoldRule, ...]
    no_clip: Tuple[str, ...] = ("q_proj", "k_proj")  # leaf names AWQ does not clip (error acts via softmax)

    def rule_for(self, group: Sequence[str]) -> Optional[FoldRule]:
        for rule in self.rules:
            if set(rule.consumers) == set(group):
                return rule
        return None

    def clips(self, name: str) -> bool:
        return name.rsplit(".", 1)[-1] not in self.no_clip


def attention_heads(block: nn.Module, path: str) -> Tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of the attention module at ``path``."""
    attn = block.get_submodule(path)
    cfg = getattr(attn, "config", None)
    n_heads = getattr(cfg, "num_attention_heads", None)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(attn, "head_dim", None)
    if not (n_heads and head_dim):
        raise FormatError(f"attention module {path!r} ({type(attn).__name__}) does not say its heads and head_dim")
    return int(n_heads), int(n_kv), int(head_dim)


def _phi3_value_rows(block: nn.Module) -> Tuple[int, int]:
    # qkv_proj's rows are [q (n_heads * d) | k (n_kv * d) | v (n_kv * d)].
    n_heads, n_kv, d = attention_heads(block, "self_attn")
    return n_heads * d + n_kv * d, n_heads * d + 2 * n_kv * d


def _phi3_up_rows(block: nn.Module) -> Tuple[int, int]:
    # gate_up_proj's rows are [gate | up]; down_proj reads up * act(gate).
    inter = block.get_submodule("mlp.down_proj").in_features
    return inter, 2 * inter


def _llama_like(mlp_norm: str) -> Tuple[FoldRule, ...]:
    return (
        FoldRule(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
        FoldRule(("self_attn.o_proj",), "self_attn.v_proj", heads="self_attn"),
        FoldRule(("mlp.gate_proj", "mlp.up_proj"), mlp_norm),
        FoldRule(("mlp.down_proj",), "mlp.up_proj"),  # down reads act(gate) * up
    )


# Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms act after the projections: no fold
# crosses them): one norm before attention, one before the MLP.
_LLAMA = _llama_like("post_attention_layernorm")
# Gemma 2/3: four norms per block; post_attention/post_feedforward normalize the branch outputs,
# pre_feedforward feeds the MLP. Their RMSNorm computes x * (1 + w) (the probe finds that).
_GEMMA = _llama_like("pre_feedforward_layernorm")
_PHI3 = (
    FoldRule(("self_attn.qkv_proj",), "input_layernorm"),
    FoldRule(("self_attn.o_proj",), "self_attn.qkv_proj", rows=_phi3_value_rows, heads="self_attn"),
    FoldRule(("mlp.gate_up_proj",), "post_attention_layernorm"),
    FoldRule(("mlp.down_proj",), "mlp.gate_up_proj", rows=_phi3_up_rows),
)

ADAPTERS: Dict[str, Adapter] = {
    "llama": Adapter("llama", _LLAMA),
    "mistral": Adapter("mistral", _LLAMA),
    "qwen2": Adapter("qwen2", _LLAMA),
    "qwen3": Adapter("qwen3", _LLAMA),
    "gemma2": Adapter("gemma2", _GEMMA),
    "gemma3_text": Adapter("gemma3_text", _GEMMA),
    "phi3": Adapter("phi3", _PHI3, no_clip=("qkv_proj",)),
}

# A model without an adapter: no rules, and the usual q/k names are not clipped.
GENERIC = Adapter("generic", ())


def family_of(model: nn.Module) -> str:
    """The model's family name: ``config.model_type``, else its class name."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return str(model_type) if model_type else type(model).__name__


def adapter_for(model: nn.Module) -> Optional[Adapter]:
    return ADAPTERS.get(family_of(model))
