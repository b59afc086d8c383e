"""bitsandbytes NF4 models against bitsandbytes and transformers' BitsAndBytesConfig (on the CPU)."""
import json

import pytest
import torch

from pyquant.formats import NF4
from pyquant.io import bnb as pq_bnb
from pyquant.io.exchange import export_model, import_model
from pyquant.io.hf_model import quantized_layers
from tests.deps import require
from tests.io.exchange_util import quantized_copy, tiny_llama, token_ids

bnb = require("bitsandbytes")
transformers = require("transformers")


def _peer_weight(linear4bit):
    return bnb.functional.dequantize_4bit(linear4bit.weight.data, linear4bit.weight.quant_state).float()


def _bnb_model(path, double_quant):
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").eval()


@pytest.mark.parametrize("double_quant", [False, True])
def test_transformers_bnb_checkpoint_imports_bit_exact(double_quant, tmp_path):
    tiny_llama().save_pretrained(tmp_path / "float")
    peer = _bnb_model(tmp_path / "float", double_quant)
    peer.save_pretrained(tmp_path / "bnb")
    ours = import_model(tmp_path / "bnb")
    layers = quantized_layers(ours)
    assert len(layers) == 14
    for name, mod in layers.items():
        assert mod.qformat == NF4(64, double_quant)
        assert torch.equal(mod.dequantized_weight(), _peer_weight(peer.get_submodule(name))), name
    ids = token_ids()
    with torch.no_grad():  # bitsandbytes' CPU matmul rounds through a lower precision than fp32
        torch.testing.assert_close(ours(ids).logits, peer(ids).logits, rtol=0, atol=1e-2)


@pytest.mark.parametrize("double_quant", [False, True])
def test_export_loads_in_transformers_bit_exact(double_quant, tmp_path):
    model = quantized_copy(tiny_llama(), NF4(64, double_quant))
    export_model(model, tmp_path, "bnb", overwrite=True)
    q = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q["load_in_4bit"]
    peer = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu").eval()
    for name, mod in quantized_layers(model).items():
        layer = peer.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit), name
        assert torch.equal(_peer_weight(layer), mod.dequantized_weight()), name
        # the entries are what bitsandbytes itself serializes
        ours = pq_bnb.export_layer(mod.quantized_weight)
        theirs = layer.weight.quant_state.as_dict(packed=True)
        assert sorted(ours) == sorted(["weight"] + [f"weight.{k}" for k in theirs])
        for key, t in theirs.items():
            assert torch.equal(ours[f"weight.{key}"], t.cpu()), key


def test_only_nf4_exports(tmp_path):
    from pyquant import FormatError
    from pyquant.formats import Int

    with pytest.raises(FormatError, match="NF4"):
        export_model(quantized_copy(tiny_llama(), Int(4, 32)), tmp_path / "x", "bnb")
