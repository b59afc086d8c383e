"""GPTQ and AWQ layers and whole checkpoints against the peers' own code.

The peer is auto-round: its ``auto_round_extension`` GPTQ QuantLinear (the
AutoGPTQ v1 layout: pack + pure-torch dequantizing forward), its AutoAWQ GEMM
packer and ``dequantize_gemm``, and its exporters that write whole auto_gptq /
auto_awq checkpoint directories. GPTQModel's v2 layout has no installable peer
on this machine (GPTQModel needs a newer torch): v2 is checked through its
definition, v1 zeros plus one.
"""
import json
import os

import pytest
import torch
from torch import nn

import pyquant
from pyquant.formats import Int
from pyquant.io import awq, gptq
from pyquant.io.exchange import export_model, import_model
from pyquant.io.hf_model import quantized_layers
from pyquant.io.int32_bitstream import pack_int32, unpack_int32
from tests.deps import require
from tests.io.exchange_util import (
    assert_same_layers,
    autoround_checkpoint,
    quantized_copy,
    read_tensors,
    tiny_llama,
    token_ids,
)

require("auto_round")
from auto_round.export.export_to_awq.utils import WQLinear_GEMM, dequantize_gemm  # noqa: E402
from auto_round_extension.torch.qlinear_torch_zp import QuantLinear as PeerGPTQLinear  # noqa: E402


def _random_int_weight(bits, n, k, group, symmetric, seed, act_order=False, zero_min=0):
    g = torch.Generator().manual_seed(seed)
    ng = -(-k // group)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int64).to(torch.uint8)
    scales = (torch.rand(n, ng, generator=g) * 0.05 + 0.001).half()
    zeros = None if symmetric else torch.randint(zero_min, 2**bits, (n, ng), generator=g).float()
    perm = torch.randperm(k, generator=g).to(torch.int32) if act_order else None
    return Int(bits, group, symmetric, torch.float16, act_order).pack(codes, scales, zeros, perm=perm)


def _peer_gptq_weight(t, bits, group, n, k):
    """(N, K) fp16: the peer's forward on the identity, i.e. its dequantized weight.

    The peer's g_idx path slices its scales by K and so only works for N <= K;
    wider layers go through its sequential-group path, valid for a trivial g_idx.
    """
    use_g_idx = n <= k
    if not use_g_idx:
        assert torch.equal(t["g_idx"], (torch.arange(k) // group).to(torch.int32))
    layer = PeerGPTQLinear(bits, group, k, n, bias=False, g_idx=use_g_idx)
    layer.qweight, layer.qzeros, layer.scales = t["qweight"], t["qzeros"], t["scales"]
    if use_g_idx:
        layer.g_idx = t["g_idx"]
    with torch.no_grad():
        return layer(torch.eye(k, dtype=torch.float16)).T


def _peer_gptq_pack(qw, bits, group):
    """The peer's GPTQ v1 tensors for the weight ``qw`` dequantizes to, packed by the peer."""
    n, k = qw.shape
    codes, scales, zeros = qw.format.unpack(qw)
    linear = nn.Linear(k, n, bias=False)
    linear.weight.data = qw.dequantize()
    layer = PeerGPTQLinear(bits, group, k, n, bias=False, g_idx=True)
    layer.pack(linear, scales.float(), zeros.float(), None)
    return {"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales, "g_idx": layer.g_idx}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_layer_both_ways_with_autogptq_layout(bits, symmetric):
    n, k, group = 64, 128, 32
    qw = _random_int_weight(bits, n, k, group, symmetric, seed=bits, zero_min=1)
    peer = _peer_gptq_pack(qw, bits, group)
    # peer -> pyquant: same dequantized weight, same format
    imported = gptq.import_layer(peer, bits, group, "gptq")
    assert imported.format == qw.format
    assert torch.equal(imported.dequantize().half(), _peer_gptq_weight(peer, bits, group, n, k))
    # pyquant -> peer: the very tensors the peer packs
    ours = gptq.export_layer(qw, "gptq")
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(ours[name], peer[name]), name
    assert torch.equal(_peer_gptq_weight(ours, bits, group, n, k), qw.dequantize().half())


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_act_order_g_idx_read_by_peer(bits):
    n, k, group = 64, 96, 32
    qw = _random_int_weight(bits, n, k, group, False, seed=7, act_order=True, zero_min=1)
    ours = gptq.export_layer(qw)
    assert not torch.equal(ours["g_idx"], (torch.arange(k) // group).to(torch.int32))
    assert torch.equal(_peer_gptq_weight(ours, bits, group, n, k), qw.dequantize().half())
    back = gptq.import_layer(ours, bits, group)
    assert back.format.act_order and torch.equal(back.dequantize(), qw.dequantize())


def test_gptq_v2_is_v1_plus_one_and_holds_zero_point_zero():
    qw = _random_int_weight(4, 64, 64, 32, False, seed=3, zero_min=0)
    qw.tensors["zeros"][0, 0] = 0.0
    with pytest.raises(pyquant.FormatError, match="gptq_v2"):
        gptq.export_layer(qw, "gptq")
    v2 = gptq.export_layer(qw, "gptq_v2")
    z = unpack_int32(v2["qzeros"], 4, 1, 64)
    assert int(z.min()) == 0
    assert torch.equal(gptq.import_layer(v2, 4, 32, "gptq_v2").dequantize(), qw.dequantize())
    qw1 = _random_int_weight(4, 64, 64, 32, False, seed=4, zero_min=1)
    v1, v2 = gptq.export_layer(qw1, "gptq"), gptq.export_layer(qw1, "gptq_v2")
    assert torch.equal(pack_int32(unpack_int32(v1["qzeros"], 4, 1, 64) + 1, 4, 1), v2["qzeros"])


def test_awq_layer_both_ways_with_autoawq_packer():
    n, k, group = 64, 128, 32
    qw = _random_int_weight(4, n, k, group, False, seed=11)
    codes, scales, zeros = qw.format.unpack(qw)
    linear = nn.Linear(k, n, bias=False)
    linear.weight.data = qw.dequantize()
    peer = WQLinear_GEMM.from_linear(linear, 4, group, scales=scales.T.float(), zeros=zeros.T.int())
    t = {"qweight": peer.qweight, "qzeros": peer.qzeros, "scales": peer.scales}
    imported = awq.import_layer(t, 4, group)
    peer_w = dequantize_gemm(peer.qweight, peer.qzeros, peer.scales, 4, group).T
    assert torch.equal(imported.dequantize().half(), peer_w)
    ours = awq.export_layer(qw)
    for name in t:
        assert torch.equal(ours[name], t[name]), name


@pytest.fixture(scope="module")
def autoround_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoround")
    return {
        "gptq": autoround_checkpoint(str(root / "gptq"), "auto_gptq", bits=4, group_size=32, sym=False),
        "awq": autoround_checkpoint(str(root / "awq"), "auto_awq", bits=4, group_size=32, sym=False),
    }


def _peer_weights(fmt, tensors, prefix, n, k, group):
    t = {key[len(prefix) + 1:]: v for key, v in tensors.items() if key.startswith(prefix + ".")}
    if fmt == "gptq":
        return _peer_gptq_weight(t, 4, group, n, k)
    return dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], 4, group).T


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_checkpoint_written_by_peer_imports_and_exports_back_unchanged(fmt, autoround_dirs, tmp_path):
    src = autoround_dirs[fmt]
    model = import_model(src)
    files = read_tensors(src)
    layers = quantized_layers(model)
    assert len(layers) == 7  # every linear of the block; the head stays float
    for name, mod in layers.items():
        n, k = mod.out_features, mod.in_features
        assert torch.equal(mod.dequantized_weight().half(), _peer_weights(fmt, files, name, n, k, 32)), name
    out = tmp_path / "back"
    export_model(model, out, fmt)
    written = read_tensors(str(out))
    for name in layers:
        for part in gptq.LAYER_TENSORS if fmt == "gptq" else awq.LAYER_TENSORS:
            key = f"{name}.{part}"
            assert torch.equal(written[key], files[key]), key
    with torch.no_grad():
        ids = token_ids(49152)
        assert torch.equal(model(ids).logits, import_model(out)(ids).logits)


def test_exported_model_config_and_peer_weights(tmp_path):
    base = tiny_llama()
    model = quantized_copy(base, Int(4, 32, False))
    export_model(model, tmp_path / "g", "gptq", checkpoint_format="gptq")
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["checkpoint_format"], q["sym"]) == ("gptq", 4, 32, "gptq", False)
    assert json.loads((tmp_path / "g" / "quantize_config.json").read_text()) == q
    files = read_tensors(str(tmp_path / "g"))
    for name, mod in quantized_layers(model).items():
        peer = _peer_weights("gptq", files, name, mod.out_features, mod.in_features, 32)
        assert torch.equal(peer, mod.dequantized_weight().half()), name
    assert_same_layers(model, import_model(tmp_path / "g"))
    export_model(model, tmp_path / "a", "awq")
    q = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["version"], q["zero_point"]) == ("awq", "gemm", True)
    assert_same_layers(model, import_model(tmp_path / "a"))


def test_tied_embeddings_are_written_once_and_tied_again(tmp_path):
    model = quantized_copy(tiny_llama(tie=True), Int(4, 32, True))
    export_model(model, tmp_path, "gptq", overwrite=True)
    assert "lm_head.weight" not in read_tensors(str(tmp_path))
    back = import_model(tmp_path)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_refusals_name_the_layer_and_the_fix(tmp_path):
    base = tiny_llama()
    hqq_like = quantized_copy(base, Int(4, 32, False))
    mod = hqq_like.model.layers[0].mlp.up_proj
    qw = mod.quantized_weight
    qw.tensors["zeros"][0, 0] = 7.25
    mod._set_qweight(qw)
    for fmt in ("gptq", "awq", "compressed-tensors"):
        with pytest.raises(pyquant.FormatError, match=r"up_proj.*float zeros.*gptq_refit='scale'"):
            export_model(hqq_like, tmp_path / fmt, fmt)
        assert not os.path.exists(tmp_path / fmt)
    fp32 = quantized_copy(base, Int(4, 32, True, torch.float32))
    with pytest.raises(pyquant.FormatError, match="scale_dtype=torch.float16"):
        export_model(fp32, tmp_path / "fp32", "gptq")
    # bf16 values all fit fp16 (in its range): such scales export unchanged
    bf16 = quantized_copy(base, Int(4, 32, True, torch.bfloat16))
    export_model(bf16, tmp_path / "bf16", "gptq")
    for a, b in zip(quantized_layers(bf16).values(), quantized_layers(import_model(tmp_path / "bf16")).values()):
        assert torch.equal(a.dequantized_weight(), b.dequantized_weight())
    mixed = quantized_copy(base, Int(4, 32, False))
    mixed.model.layers[1].mlp.down_proj = pyquant.QuantLinear.from_linear(base.model.layers[1].mlp.down_proj, Int(8, 32))
    with pytest.raises(pyquant.FormatError, match="down_proj"):
        export_model(mixed, tmp_path / "mixed", "gptq")
    with pytest.raises(pyquant.FormatError, match="AWQ"):
        export_model(quantized_copy(base, Int(3, 32)), tmp_path / "awq3", "awq")
