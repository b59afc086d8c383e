"""compressed-tensors checkpoints against the peers: transformers + compressed-tensors load
what pyquant writes, and pyquant reads what auto-round's llm-compressor exporter writes.

transformers runs compressed-tensors' own decompression (``CompressedTensorsConfig(
dequantize=True)``), so its dense weights are the peer's dequantization. Asymmetric
checkpoints load only that way: transformers' compressed path expects the zero point
unpacked while compressed-tensors packs it (an upstream mismatch).
"""
import json
import os

import pytest
import torch

import pyquant
from pyquant.formats import Int
from pyquant.io import compressed_tensors as ct
from pyquant.io.exchange import export_model, import_model
from pyquant.io.hf_model import quantized_layers
from tests.deps import require
from tests.io.exchange_util import autoround_checkpoint, quantized_copy, read_tensors, tiny_llama, token_ids

require("compressed_tensors")
transformers = require("transformers")


def _peer_dense(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
    ).eval()


def _assert_peer_weights(model, peer):
    """The peer's dense weights are pyquant's dequantization, bit for bit: the exact
    q * s, or that product rounded to the scales' dtype. With transformers 5.25 and
    compressed-tensors 0.20.1 the decompression multiplies in the scales' dtype (fp16
    scales give fp16 products, widened afterwards); the releases CI installed until
    2026-12-05 gave the exact product."""
    for name, mod in quantized_layers(model).items():
        w = peer.get_submodule(name).weight
        in_scale_dtype = mod.dequantized_weight(mod.quantized_weight.format.scale_dtype).to(w.dtype)
        assert torch.equal(mod.dequantized_weight(w.dtype), w) or torch.equal(in_scale_dtype, w), name


@pytest.mark.parametrize(
    "fmt",
    [Int(4, 32, True), Int(4, -1, True), Int(8, -1, True), Int(8, 128, True), Int(3, 32, True), Int(4, 32, False),
     Int(8, 32, False)],
    ids=lambda f: f.spec(),
)
def test_export_loads_in_transformers_with_the_same_weights(fmt, tmp_path):
    model = quantized_copy(tiny_llama(), fmt)
    export_model(model, tmp_path, "compressed-tensors", overwrite=True)
    q = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert q["format"] == "pack-quantized" and q["ignore"] == ["lm_head"]
    peer = _peer_dense(tmp_path)
    _assert_peer_weights(model, peer)
    ids = token_ids()
    with torch.no_grad():
        ours = model(ids).logits
        torch.testing.assert_close(peer(ids).logits, ours, rtol=0, atol=1e-5)
        if fmt.symmetric:  # the compressed (serving) path gives the same logits as the dense one
            compressed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
            assert torch.equal(compressed(ids).logits, peer(ids).logits)
    back = import_model(tmp_path)
    for a, b in zip(quantized_layers(model).values(), quantized_layers(back).values()):
        assert a.qformat.bits == b.qformat.bits and torch.equal(a.dequantized_weight(), b.dequantized_weight())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_the_peers_pack_to_int32(bits):
    """Codes along K and zero points along N, ragged tails included. (transformers 5.25 cannot
    load 2-bit pack-quantized checkpoints, its own or ours: checked here at the packing level.)"""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    n, k = 40, 100
    qw = Int(bits, -1, False, torch.float16).pack(
        torch.randint(0, 2**bits, (n, k), generator=g).to(torch.uint8),
        torch.rand(n, 1, generator=g).half() + 0.01,
        torch.randint(0, 2**bits, (n, 1), generator=g).float(),
    )
    t = ct.export_layer(qw)
    codes, _, zeros = qw.format.unpack(qw)
    mid = 1 << (bits - 1)
    assert torch.equal(t["weight_packed"], pack_to_int32((codes.long() - mid).to(torch.int8), bits, packed_dim=1))
    assert torch.equal(t["weight_zero_point"], pack_to_int32((zeros.long() - mid).to(torch.int8), bits, packed_dim=0))


def test_act_order_weight_round_trips_with_g_idx():
    g = torch.Generator().manual_seed(5)
    n, k = 64, 128
    codes = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8)
    scales = torch.rand(n, 4, generator=g).half() * 0.05 + 0.01
    perm = torch.randperm(k, generator=g).to(torch.int32)
    qw = Int(4, 32, True, torch.float16, True).pack(codes, scales, perm=perm)
    t = ct.export_layer(qw)
    assert t["weight_g_idx"].dtype == torch.int32
    args = ct.WeightArgs({"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32}, "test", "pack-quantized")
    back = ct.import_layer(t, args)
    assert back.format.act_order and torch.equal(back.dequantize(), qw.dequantize())
    # the peer's unpacking of the codes (before the scales) sees the original column order
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    q = unpack_from_int32(t["weight_packed"], 4, torch.Size([n, k]))
    orig = torch.empty_like(codes)
    orig[:, perm.long()] = codes
    assert torch.equal(q.to(torch.int16) + 8, orig.to(torch.int16))


@pytest.fixture(scope="module")
def llm_compressor_dir(tmp_path_factory):
    return autoround_checkpoint(str(tmp_path_factory.mktemp("llmc")), "llm_compressor", bits=4, group_size=32, sym=True)


def test_llm_compressor_checkpoint_imports_bit_exact_and_exports_back(llm_compressor_dir, tmp_path):
    model = import_model(llm_compressor_dir)
    assert len(quantized_layers(model)) == 7
    peer = _peer_dense(llm_compressor_dir, dtype=next(model.parameters()).dtype)
    _assert_peer_weights(model, peer)
    export_model(model, tmp_path / "back", "compressed-tensors")
    src, back = read_tensors(llm_compressor_dir), read_tensors(str(tmp_path / "back"))
    for name in quantized_layers(model):
        for part in ("weight_packed", "weight_scale", "weight_shape"):
            key = f"{name}.{part}"
            assert torch.equal(back[key], src[key]), key


LLMC = os.path.join(os.path.dirname(__file__), "..", "fixtures", "llmcompressor_checkpoints")


@pytest.mark.parametrize("scheme", ["w4a16", "w4a16_asym", "w8a16"])
def test_llm_compressor_written_checkpoint(scheme, tmp_path):
    """Checkpoints llm-compressor 0.14 wrote (tests/fixtures/llmcompressor_checkpoints/make.py)."""
    src = os.path.join(LLMC, scheme)
    model = import_model(src)
    layers = quantized_layers(model)
    assert len(layers) == 7 and next(model.parameters()).dtype == torch.bfloat16
    _assert_peer_weights(model, _peer_dense(src, torch.bfloat16))
    export_model(model, tmp_path / "back", "compressed-tensors")
    before, after = read_tensors(src), read_tensors(str(tmp_path / "back"))
    assert set(before) == set(after)
    for key, t in before.items():
        assert after[key].dtype == t.dtype and torch.equal(after[key], t), key


def test_unpacked_int8_layout_reads_the_peer_quantizer_output():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=g)
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    zp = torch.zeros_like(scale, dtype=torch.int8)
    qargs = QuantizationArgs(num_bits=8, symmetric=True, strategy="channel")
    q = quantize(w, scale, zp, qargs, dtype=torch.int8)
    args = ct.WeightArgs({"num_bits": 8, "symmetric": True, "strategy": "channel"}, "test", "naive-quantized")
    qw = ct.import_layer({"weight": q, "weight_scale": scale}, args)
    assert torch.equal(qw.dequantize(), dequantize(q, scale, zp, qargs))


def test_refusals(tmp_path):
    base = tiny_llama()
    with pytest.raises(pyquant.ShapeError, match="divisible by group_size"):
        export_model(quantized_copy(tiny_llama(hidden=96), Int(4, 64, True)), tmp_path / "ragged", "compressed-tensors")
    fp32_model_bf16_scales = quantized_copy(base, Int(4, 32, True, torch.float32)).to(torch.bfloat16)
    with pytest.raises(pyquant.FormatError, match="scale_dtype=torch.bfloat16"):
        export_model(fp32_model_bf16_scales, tmp_path / "dtype", "compressed-tensors")
    bad = {"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}, "input_activations": {"num_bits": 8}}}}
    with pytest.raises(pyquant.FormatError, match="activations"):
        ct.Scheme(bad, "config.json")
