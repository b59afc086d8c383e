"""pyquant checkpoints through transformers: from_pretrained builds QuantLinear layers from the packed
tensors, save_pretrained writes the same layout, and a quantized model never comes back dense."""
import json
import os

import pytest
import torch

from tests.deps import require
from tests.isolated_python import run_python

transformers = require("transformers")
require("safetensors")

import pyquant  # noqa: E402
from pyquant.errors import FormatError  # noqa: E402
from pyquant.formats import NF4  # noqa: E402
from pyquant.nn import QuantLinear  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 64]])


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def quantized():
    """A tiny Llama after quantize_model (RTN int4), one layer overridden to NF4."""
    model = tiny_llama()
    pyquant.quantize_model(model, pyquant.QuantConfig("rtn", bits=4, group_size=32), None, progress=False,
                           verbose=False)
    layer = model.model.layers[1].mlp.down_proj
    model.model.layers[1].mlp.down_proj = QuantLinear.from_linear(
        torch.nn.Linear(layer.in_features, layer.out_features, bias=False), NF4(64))
    with torch.no_grad():
        logits = model(IDS).logits
    return model, logits


def _quantized_names(model):
    return {n: m.qformat.spec() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_save_quantized_then_from_pretrained(quantized, tmp_path):
    model, logits = quantized
    path = pyquant.save_quantized(model, tmp_path / "q", method="rtn")
    qc = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "pyquant" and qc["method"] == "rtn"
    assert qc["layers"] == {"model.layers.1.mlp.down_proj": "nf4_b64"}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert _quantized_names(loaded) == _quantized_names(model)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, logits)
    # load_quantized is the same path, and checks it was taken
    again = pyquant.load_quantized(path)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, logits)


def test_save_pretrained_writes_the_same_layout(quantized, tmp_path):
    model, logits = quantized
    a = pyquant.save_quantized(model, tmp_path / "a", method="rtn")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(a)
    loaded.save_pretrained(tmp_path / "b")
    ta, tb = load_file(os.path.join(a, "model.safetensors")), load_file(tmp_path / "b" / "model.safetensors")
    assert ta.keys() == tb.keys()
    assert all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)
    qa = json.load(open(os.path.join(a, "config.json")))["quantization_config"]
    qb = json.load(open(tmp_path / "b" / "config.json"))["quantization_config"]
    assert qa == qb


def test_quantized_model_saved_with_save_pretrained_never_loads_dense(tmp_path):
    """The bug this replaces: from_pretrained of such a directory built a random dense model."""
    model = tiny_llama(seed=1)
    pyquant.quantize_model(model, pyquant.QuantConfig("rtn", bits=4, group_size=32), None, progress=False,
                           verbose=False)
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path / "d")
    qc = json.load(open(tmp_path / "d" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "pyquant" and qc["format"] == "int4_g32_asym_fp16"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert _quantized_names(loaded) == _quantized_names(model)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, logits)


def test_broken_checkpoint_fails_from_pretrained(quantized, tmp_path):
    model, _ = quantized
    path = pyquant.save_quantized(model, tmp_path / "x")
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    key = "model.layers.0.self_attn.q_proj.scales"
    tensors[key] = tensors[key].float()
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(FormatError, match=rf"model.safetensors: tensor '{key}': dtype torch.float32"):
        transformers.AutoModelForCausalLM.from_pretrained(path)


def test_missing_float_tensor_fails_from_pretrained(quantized, tmp_path):
    """transformers would initialise a missing norm at random: pyquant's quantizer refuses first."""
    model, _ = quantized
    path = pyquant.save_quantized(model, tmp_path / "z")
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    del tensors["model.norm.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(FormatError, match=r"model.safetensors: missing tensor 'model.norm.weight'"):
        transformers.AutoModelForCausalLM.from_pretrained(path)


def test_plain_checkpoint_needs_a_model(tmp_path):
    net = torch.nn.Sequential(QuantLinear.from_linear(torch.nn.Linear(64, 64), NF4(64)))
    path = pyquant.save_quantized(net, tmp_path / "plain")
    with pytest.raises(FormatError, match="describes no transformers model.*model="):
        pyquant.load_quantized(path)


def test_transformers_imported_before_pyquant(quantized, tmp_path):
    """Registration works whichever of the two is imported first (a fresh interpreter)."""
    model, logits = quantized
    path = pyquant.save_quantized(model, tmp_path / "y")
    torch.save(logits, tmp_path / "logits.pt")
    r = run_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        import pyquant
        m = AutoModelForCausalLM.from_pretrained({path!r})
        with torch.no_grad():
            out = m(torch.tensor({IDS.tolist()})).logits
        print(torch.equal(out, torch.load({str(tmp_path / 'logits.pt')!r})))
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("True")
