"""GGUF writing and the quantized GGUF loader, against gguf-py and transformers' GGUF loader.

llama.cpp itself is not installable here (it builds from source); transformers'
GGUF loader is the stand-in: it needs the same architecture metadata,
hyperparameters and vocabulary, dequantizes with gguf-py and undoes llama.cpp's
q/k row order with its own code.
"""
import os

import numpy as np
import pytest
import torch

import pyquant
from pyquant.formats import GGUF, NF4, Int, QuantizedWeight
from pyquant.formats.gguf import BLOCK_TYPES
from pyquant.io.exchange import export_model, import_model
from pyquant.io.gguf import GGUFFile, ValueType
from pyquant.io.gguf_model import export_gguf, int_to_gguf, load_gguf_quantized
from pyquant.io.gguf_writer import write_gguf
from pyquant.io.hf_model import quantized_layers
from pyquant.ops.backends.cpu_activations import cpu_activations
from tests.deps import require, smollm2_gguf
from tests.io.exchange_util import assert_same_layers, quantized_copy, tiny_llama, token_ids

gguf = require("gguf")
transformers = require("transformers")


def _reader_tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _raw(tensor) -> bytes:
    return np.asarray(tensor.data).tobytes()


def test_writer_round_trips_every_type_through_gguf_py(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, bt in BLOCK_TYPES.items():
        n, k = 3, 2 * bt.block_size
        blocks = torch.randint(0, 256, (n, k // bt.block_size * bt.type_size), generator=g, dtype=torch.uint8)
        tensors[f"q.{name}"] = QuantizedWeight(GGUF(name), {"blocks": blocks}, (n, k))
    tensors["d.f32"] = torch.randn(4, 5, generator=g)
    tensors["d.f16"] = torch.randn(7, generator=g).half()
    tensors["d.bf16"] = torch.randn(2, 3, 4, generator=g).bfloat16()
    tensors["d.i32"] = torch.arange(-5, 5, dtype=torch.int32)
    metadata = {
        "general.architecture": "llama", "u32": 7, "i32": -3, "u64": 1 << 40, "f32": 0.5, "flag": True,
        "text": "héllo", "ints": [1, 2, 3], "floats": [0.25, -1.0], "strings": ["a", "", "ü"], "i8": -2,
        "u8s": [1, 2],
    }
    types = {"i8": ValueType.INT8, "u8s": (ValueType.ARRAY, ValueType.UINT8)}
    path = write_gguf(tmp_path / "all.gguf", metadata, tensors, types)
    reader = gguf.GGUFReader(path)
    read = {t.name: t for t in reader.tensors}
    for name, t in tensors.items():
        if isinstance(t, QuantizedWeight):
            assert read[name].tensor_type == BLOCK_TYPES[t.format.type].ggml_type
            assert _raw(read[name]) == t.tensors["blocks"].numpy().tobytes(), name
            assert list(read[name].shape) == [t.shape[1], t.shape[0]]
        else:
            assert _raw(read[name]) == t.contiguous().view(torch.uint8).numpy().tobytes(), name
            assert list(read[name].shape) == list(reversed(t.shape))
    assert reader.fields["text"].contents() == "héllo"
    assert reader.fields["strings"].contents() == ["a", "", "ü"]
    assert reader.fields["u64"].contents() == 1 << 40 and reader.fields["i8"].contents() == -2
    with GGUFFile(path) as f:  # pyquant's own reader agrees, types included
        for key, value in metadata.items():
            assert f.metadata[key] == pytest.approx(value) if isinstance(value, float) else f.metadata[key] == value
        assert f.metadata_types["u8s"] == (ValueType.ARRAY, ValueType.UINT8)
        assert torch.equal(f.tensor("d.bf16"), tensors["d.bf16"])
        assert torch.equal(f.tensor("q.Q6_K").tensors["blocks"], tensors["q.Q6_K"].tensors["blocks"])


def _bpe_tokenizer():
    """A small byte-level BPE tokenizer trained here (the layout of SmolLM2's and Llama 3's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The quick brown fox jumps over the lazy dog. " * 4, "Quantized models run in llama.cpp."]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")


def test_q4_k_model_exports_a_file_llama_cpp_style_loaders_read(tmp_path):
    tok = _bpe_tokenizer()
    base = tiny_llama(vocab_size=len(tok), hidden=256, layers=1)
    model = quantized_copy(base, GGUF("Q4_K"))
    path = export_model(model, tmp_path / "m.gguf", "gguf", tokenizer=tok)
    # gguf-py reads back our block bytes (q/k rows in llama.cpp's rope order)
    read = _reader_tensors(path)
    up = model.model.layers[0].mlp.up_proj.quantized_weight
    assert _raw(read["blk.0.ffn_up.weight"]) == up.tensors["blocks"].numpy().tobytes()
    assert read["blk.0.attn_q.weight"].tensor_type == BLOCK_TYPES["Q4_K"].ggml_type
    # pyquant's quantized loader gives the model back, block bytes and all
    assert_same_layers(model, import_model(path))
    # transformers' GGUF loader (gguf-py dequantization, its own q/k reordering, the vocabulary)
    peer = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    for name, mod in quantized_layers(model).items():
        assert torch.equal(peer.get_submodule(name).weight, mod.dequantized_weight()), name
    peer_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "The lazy fox runs quantized."
    assert peer_tok(text).input_ids[-len(tok(text).input_ids):] == tok(text).input_ids
    ids = token_ids(len(tok))
    # the peer multiplies its dense weights exactly: so does pyquant in the CPU kernels' exact mode
    # (GGUF's default there is llama.cpp's int8 activations, off by the rounding of x to 8 bits)
    with torch.no_grad(), cpu_activations("fp32"):
        torch.testing.assert_close(peer(ids).logits, model(ids).logits, rtol=0, atol=1e-4)


def test_int_layers_become_legacy_blocks_exactly():
    base = tiny_llama(hidden=64, layers=1)
    w = base.model.layers[0].mlp.up_proj.weight.detach()
    for fmt, block in ((Int(4, 32, True), "Q4_0"), (Int(8, 32, True), "Q8_0")):
        qw = pyquant.quantize_weight(w, fmt)
        out = int_to_gguf(qw)
        assert out.format == GGUF(block)
        peer = gguf.quants.dequantize(out.tensors["blocks"].numpy(), gguf.GGMLQuantizationType[block])
        assert np.array_equal(peer, qw.dequantize().numpy())
    # Q4_1 holds an asymmetric weight when -scale * zero is an fp16 value
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    qw = Int(4, 32, False).pack(codes, torch.full((8, 2), 0.125).half(), torch.full((8, 2), 5.0))
    out = int_to_gguf(qw)
    assert out.format == GGUF("Q4_1")
    assert np.array_equal(gguf.quants.dequantize(out.tensors["blocks"].numpy(), gguf.GGMLQuantizationType.Q4_1),
                          qw.dequantize().numpy())
    with pytest.raises(pyquant.FormatError, match="GGUF method"):
        int_to_gguf(pyquant.quantize_weight(w, Int(4, 64, True)))


def test_refusals(tmp_path):
    tok = _bpe_tokenizer()
    model = quantized_copy(tiny_llama(vocab_size=len(tok)), NF4())
    with pytest.raises(pyquant.FormatError, match="no GGUF block type"):
        export_gguf(model, tmp_path / "nf4.gguf", tokenizer=tok)
    with pytest.raises(pyquant.FormatError, match="vocabulary"):
        export_gguf(quantized_copy(tiny_llama(), Int(4, 32, True)), tmp_path / "notok.gguf")
    assert not os.listdir(tmp_path)


def test_header_hyperparameters_are_checked_against_the_tensors(tmp_path):
    tok = _bpe_tokenizer()
    path = export_model(quantized_copy(tiny_llama(vocab_size=len(tok), layers=1), Int(4, 32, True)),
                        tmp_path / "ok.gguf", "gguf", tokenizer=tok)
    with GGUFFile(path) as f:
        metadata, types = dict(f.metadata), dict(f.metadata_types)
        tensors = {name: f.tensor(name) for name in f.tensor_names()}
    for key, value in (("llama.embedding_length", 1 << 30), ("llama.block_count", 1 << 20),
                       ("llama.feed_forward_length", 129)):
        bad = write_gguf(tmp_path / "bad.gguf", {**metadata, key: value}, tensors, types, overwrite=True)
        with pytest.raises(pyquant.FormatError, match="bad.gguf"):
            load_gguf_quantized(bad)


@pytest.mark.slow
def test_smollm2_gguf_round_trip_keeps_every_block(tmp_path):
    from pyquant.integrations.transformers import load_gguf_llama_model

    src = smollm2_gguf()
    model = load_gguf_quantized(src)
    dense = load_gguf_llama_model(src)  # pyquant's float loader (bit-exact with gguf-py by its own tests)
    layers = quantized_layers(model)
    assert len(layers) == 7 * 30
    for name, mod in layers.items():
        assert torch.equal(mod.dequantized_weight(), dense.get_submodule(name).weight), name
    out = export_gguf(model, tmp_path / "rt.gguf", tokenizer_gguf=src)
    before, after = _reader_tensors(src), _reader_tensors(out)
    assert set(before) == set(after)
    for name, t in before.items():
        if name == "token_embd.weight":  # an embedding is dequantized on import: same values, F32
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            assert np.array_equal(np.asarray(after[name].data).reshape(values.shape), values)
            continue
        assert after[name].tensor_type == t.tensor_type and _raw(after[name]) == _raw(t), name
    with GGUFFile(src) as a, GGUFFile(out) as b:
        for key, value in a.metadata.items():
            if key.startswith("tokenizer."):
                assert b.metadata[key] == value and b.metadata_types[key] == a.metadata_types[key], key
