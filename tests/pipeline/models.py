"""Tiny random-weight decoder models of every family quantize_model claims, built
from transformers' own configs (a few seconds on 2 cores for all of them)."""
import torch

from pyquant import QuantConfig
from tests.deps import require

VOCAB = 128
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64)
# family -> (config class, model class, extra config)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}
# A family pyquant has no adapter for (LayerNorm with bias, Llama's layer names).
UNCLAIMED = {"stablelm": ("StableLmConfig", "StableLmForCausalLM", {})}


# Small search grids keep the tests fast; the algorithms are the same.
FAST = dict(awq_grid=5, awq_clip_grid=5, clip_grid=5)


def fast_config(method, **kw):
    extra = {k: v for k, v in FAST.items() if k not in kw}
    return QuantConfig(method, **extra, **kw)


def tiny_llama(seed=0, kv_heads=2, layers=2, vocab=256):
    transformers = require("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**COMMON, "num_key_value_heads": kv_heads, "num_hidden_layers": layers,
                                      "vocab_size": vocab})
    return transformers.LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def tiny_model(family, seed=0):
    """A 2-block model of ``family`` whose norms have random weights (so how a norm
    applies its weight matters) and whose activations have a few large channels
    (so AWQ scales every group): embedding columns, and the rows of the layers
    feeding o_proj and down_proj."""
    transformers = require("transformers")
    config_cls, model_cls, extra = {**FAMILIES, **UNCLAIMED}[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **extra)).eval()
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.add_(0.3 * torch.randn_like(p))
    model.get_input_embeddings().weight[:, :4] *= 20
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if hasattr(attn, "v_proj"):
            attn.v_proj.weight[:3] *= 8
            mlp.up_proj.weight[:3] *= 8
        else:  # Phi-3's fused projections: value rows after q and k, up rows after gate
            v0 = attn.qkv_proj.out_features - attn.num_key_value_heads * attn.head_dim
            attn.qkv_proj.weight[v0 : v0 + 3] *= 8
            mlp.gate_up_proj.weight[mlp.down_proj.in_features :][:3] *= 8
    return model


def token_ids(n, seq=32, seed=1, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g)


def rel_mse(a, b):
    return float((a - b).pow(2).mean() / b.pow(2).mean())


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits
