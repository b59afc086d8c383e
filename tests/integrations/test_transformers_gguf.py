"""load_gguf_llama: pyquant's GGUF reader feeding transformers' LlamaForCausalLM.

Fast tests build a tiny llama GGUF from a random transformers model (permuting
q/k rows the way llama.cpp's converter does). Slow tests load the real
SmolLM2-135M Q4_1 file and compare with transformers' own GGUF loader.
No network: HF_HUB_OFFLINE is set and socket connections fail during loading.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import socket  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pyquant import FormatError  # noqa: E402
from tests.deps import require, smollm2_gguf  # noqa: E402

transformers = require("transformers")
gguf = require("gguf")

from pyquant.integrations.transformers import (  # noqa: E402
    _unpermute_rope_rows,
    hf_name,
    load_gguf_llama,
    load_gguf_llama_model,
)

Q8_0 = gguf.GGMLQuantizationType.Q8_0


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf does to q_proj/k_proj rows (the direction we must undo)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llamacpp_permute():
    rng = np.random.default_rng(0)
    for n_head, head_dim, k in ((4, 16, 8), (3, 64, 5), (1, 2, 1)):
        w = rng.standard_normal((n_head * head_dim, k)).astype(np.float32)
        back = _unpermute_rope_rows(torch.from_numpy(llamacpp_permute(w, n_head)), n_head, "w")
        assert torch.equal(back, torch.from_numpy(w))
        b = rng.standard_normal(n_head * head_dim).astype(np.float32)  # biases too
        assert torch.equal(_unpermute_rope_rows(torch.from_numpy(llamacpp_permute(b, n_head)), n_head, "b"),
                           torch.from_numpy(b))
    with pytest.raises(FormatError, match="heads"):
        _unpermute_rope_rows(torch.zeros(10, 4), 4, "w")


def test_names():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert hf_name("blk.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight"
    assert hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert hf_name("rope_freqs.weight") is None and hf_name("blk.x.attn_q.weight") is None


# --- a tiny synthetic llama ---------------------------------------------------------------
def tiny_config(tied):
    return transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
        **({"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}
           if "rope_parameters" in transformers.LlamaConfig.__init__.__code__.co_varnames
           else {"rope_theta": 5000.0}),
    )


def write_tiny_gguf(path, tied, arch="llama", drop=None, reshape=None):
    """A random LlamaForCausalLM written as GGUF; returns the model holding exactly
    the weights a reader should recover (Q8_0 ffn weights round-tripped)."""
    torch.manual_seed(0)
    cfg = tiny_config(tied)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    w = gguf.GGUFWriter(path, arch)
    a = arch + "."
    w.add_uint32(a + "context_length", 128)
    w.add_uint32(a + "embedding_length", 64)
    w.add_uint32(a + "block_count", 2)
    w.add_uint32(a + "feed_forward_length", 96)
    w.add_uint32(a + "attention.head_count", 4)
    w.add_uint32(a + "attention.head_count_kv", 2)
    w.add_uint32(a + "rope.dimension_count", 16)
    w.add_float32(a + "rope.freq_base", 5000.0)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(a + "vocab_size", 96)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    inv = {}
    for i in range(2):
        for g, h in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                     ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                     ("ffn_down", "mlp.down_proj"), ("attn_norm", "input_layernorm"),
                     ("ffn_norm", "post_attention_layernorm")):
            inv[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    inv["token_embd.weight"] = "model.embed_tokens.weight"
    inv["output_norm.weight"] = "model.norm.weight"
    if not tied:
        inv["output.weight"] = "lm_head.weight"
    sd = model.state_dict()
    for gname, hname in inv.items():
        if gname == drop:
            continue
        arr = sd[hname].numpy().astype(np.float32)
        if ".attn_q." in gname:
            arr = llamacpp_permute(arr, 4)
        elif ".attn_k." in gname:
            arr = llamacpp_permute(arr, 2)
        if gname == reshape:
            arr = arr[:-1]
        if ".ffn_" in gname and arr.ndim == 2:
            q = gguf.quants.quantize(arr, Q8_0)
            w.add_tensor(gname, q, raw_dtype=Q8_0)
            with torch.no_grad():
                sd[hname].copy_(torch.from_numpy(gguf.quants.dequantize(q, Q8_0)))
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_roundtrip(tmp_path, no_network, tied):
    path = str(tmp_path / "tiny.gguf")
    ref = write_tiny_gguf(path, tied)
    ours = load_gguf_llama_model(path)
    assert ours.config.tie_word_embeddings == tied
    assert ours.config.num_key_value_heads == 2 and ours.config.head_dim == 16
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, ref_params[name]), name
    ids = torch.tensor([[1, 5, 17, 42, 93, 7, 0, 64]])
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert torch.equal(a, b) or (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_tiny_llama_bf16(tmp_path, no_network):
    path = str(tmp_path / "tiny.gguf")
    ref = write_tiny_gguf(path, tied=True)
    ours = load_gguf_llama_model(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, ref_params[name].to(torch.bfloat16)), name


def test_tiny_llama_errors(tmp_path):
    path = str(tmp_path / "bad.gguf")
    write_tiny_gguf(path, tied=True, arch="gpt2")
    with pytest.raises(FormatError, match="'llama' only"):
        load_gguf_llama_model(path)
    write_tiny_gguf(path, tied=True, drop="blk.1.ffn_norm.weight")
    with pytest.raises(FormatError, match="no GGUF tensor for"):
        load_gguf_llama_model(path)
    write_tiny_gguf(path, tied=True, reshape="blk.0.attn_v.weight")
    with pytest.raises(FormatError, match="blk.0.attn_v.weight"):
        load_gguf_llama_model(path)


# --- the real SmolLM2 file ---------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded():
    path = smollm2_gguf()
    with pytest.MonkeyPatch.context() as mp:
        def refuse(*args, **kwargs):
            raise AssertionError(f"network access attempted: {args}")

        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        ours, tok = load_gguf_llama(path)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True
        ).eval()
    return ours, tok, theirs


@pytest.mark.slow
def test_real_config_matches_transformers(loaded):
    ours, _, theirs = loaded
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours.config, key) == getattr(theirs.config, key), key
    rope = lambda c: getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta}  # noqa: E731
    assert rope(ours.config)["rope_theta"] == rope(theirs.config)["rope_theta"] == 100000.0


@pytest.mark.slow
def test_real_weights_match_transformers(loaded):
    ours, _, theirs = loaded
    theirs_params = dict(theirs.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert sorted(ours_params) == sorted(theirs_params)
    for name, p in ours_params.items():
        q = theirs_params[name]
        assert p.shape == q.shape, name
        diff = (p - q).abs().max().item()
        assert diff <= 1e-6 * q.abs().max().item(), f"{name}: max abs diff {diff}"


@pytest.mark.slow
def test_real_logits_match_transformers(loaded):
    ours, tok, theirs = loaded
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = ours(ids).logits
        b = theirs(ids).logits
    rel = ((a - b).abs().max() / b.abs().max()).item()
    assert rel <= 1e-4, f"max |ours - transformers| / max |transformers| = {rel:.3g}"
    assert tok.decode(a[0, -1].argmax()).strip() == "Rome"


@pytest.mark.slow
def test_real_perplexity(loaded):
    from pydoc_data.topics import topics

    ours, tok, _ = loaded
    text = "\n".join(topics[k] for k in ("assert", "pass", "del"))
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    assert ids.shape[1] >= 200
    with torch.no_grad():
        ppl = ours(ids, labels=ids).loss.exp().item()
    assert 1.0 < ppl < 30.0, f"perplexity {ppl:.2f} on pydoc text"
