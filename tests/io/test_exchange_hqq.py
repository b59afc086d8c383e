"""HQQ layers and models against the hqq package itself (``HQQLinear`` and its model quantizer)."""
import pytest
import torch
from torch import nn

import pyquant
from pyquant.formats import Int
from pyquant.io import hqq as pq_hqq
from pyquant.io.exchange import export_model, import_model
from pyquant.io.hf_model import quantized_layers
from tests.deps import require
from tests.io.exchange_util import quantized_copy, tiny_llama, token_ids

require("hqq")
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear  # noqa: E402


def _hqq_linear(bits, group, compute_dtype, seed=0, n=64, k=128, axis=1):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=True)
    return HQQLinear(lin, BaseQuantizeConfig(nbits=bits, group_size=group, axis=axis), compute_dtype=compute_dtype,
                     device="cpu", del_orig=False)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_hqq_layer_reads_bit_exact_in_fp32(bits, group):
    layer = _hqq_linear(bits, group, torch.float32, seed=bits)
    state = layer.state_dict()
    qw = pq_hqq.import_layer(state)
    assert qw.format == Int(bits, -1 if group == 128 else group, False, torch.float32)
    assert torch.equal(qw.dequantize(), layer.dequantize())
    back = pq_hqq.export_layer(qw)
    for key in ("W_q", "scale", "zero", "shape", "nbits", "group_size", "axis", "packing"):
        assert torch.equal(back[key], state[key]), key


@pytest.mark.parametrize("bits", [3, 4])
def test_hqq_fp16_compute_differs_by_its_own_rounding_only(bits):
    layer = _hqq_linear(bits, 64, torch.float16, seed=3)
    qw = pq_hqq.import_layer(layer.state_dict())
    ours, peer = qw.dequantize().half(), layer.dequantize()
    # hqq rounds (q - zero) to fp16 before the multiply: at most one fp16 step apart
    ulp = torch.finfo(torch.float16).eps * peer.float().abs().clamp_min(2**-14)
    assert ((ours.float() - peer.float()).abs() <= ulp).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_export_loads_into_hqqlinear(bits):
    model = quantized_copy(tiny_llama(), Int(bits, 32, False, torch.float32))
    mod = model.model.layers[0].mlp.up_proj
    state = pq_hqq.export_layer(mod.quantized_weight)
    peer = HQQLinear(None, None, compute_dtype=torch.float32, device="cpu", initialize=False)
    peer.load_state_dict(dict(state))
    assert torch.equal(peer.dequantize(), mod.dequantized_weight())


def test_hqq_model_saved_by_hqq_imports_and_exports_back(tmp_path):
    from hqq.models.hf.base import AutoHQQHFModel

    model = tiny_llama().to(torch.float32)
    AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=4, group_size=32, axis=1),
                                  compute_dtype=torch.float32, device="cpu")
    AutoHQQHFModel.save_to_safetensors(model, str(tmp_path / "hqq"), verbose=False)
    ours = import_model(tmp_path / "hqq")
    peer_layers = {n: m for n, m in model.named_modules() if isinstance(m, HQQLinear)}
    assert sorted(peer_layers) == sorted(quantized_layers(ours))
    for name, mod in quantized_layers(ours).items():
        assert torch.equal(mod.dequantized_weight(), peer_layers[name].dequantize()), name
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    export_model(ours, tmp_path / "back", "hqq")
    assert torch.equal(import_model(tmp_path / "back")(ids).logits, ours(ids).logits)


def test_refused_layouts():
    state = _hqq_linear(4, 64, torch.float32, axis=0).state_dict()
    with pytest.raises(pyquant.FormatError, match="axis=0"):
        pq_hqq.import_layer(state)
    state = _hqq_linear(4, 16, torch.float32).state_dict()
    with pytest.raises(pyquant.FormatError, match="group_size=16"):
        pq_hqq.import_layer(state)
    bad = dict(_hqq_linear(4, 64, torch.float32).state_dict())
    bad["W_q"] = bad["W_q"][:-1]
    with pytest.raises(pyquant.ShapeError, match="W_q"):
        pq_hqq.import_layer(bad)
