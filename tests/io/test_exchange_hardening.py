"""Imports take untrusted files: every fault is a pyquant error naming the file and tensor, raised
before the model is built; exports leave nothing half-written."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyquant
from pyquant.formats import Int
from pyquant.io.exchange import export_model, import_model, sniff_format
from pyquant.io.files import atomic_output
from pyquant.io.hf_dir import TensorDir
from tests.io.exchange_util import quantized_copy, tiny_llama

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gptq") / "ckpt"
    export_model(quantized_copy(tiny_llama(layers=1), Int(4, 32, False)), path, "gptq")
    return path


def _copy(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path, fn):
    config = json.loads((path / "config.json").read_text())
    fn(config)
    (path / "config.json").write_text(json.dumps(config))


Q = "model.layers.0.self_attn.q_proj"


def test_truncated_shard_names_the_file(gptq_dir, tmp_path):
    bad = _copy(gptq_dir, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(pyquant.FormatError, match="model.safetensors: not a valid safetensors file"):
        import_model(bad)
    (bad / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(pyquant.FormatError, match="model.safetensors"):
        import_model(bad)


def test_index_cannot_point_outside_the_directory(gptq_dir, tmp_path):
    bad = _copy(gptq_dir, tmp_path / "bad")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../evil.safetensors"}}))
    with pytest.raises(pyquant.FormatError, match="not a shard file in this directory"):
        TensorDir(str(bad))
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"missing": "model.safetensors"}}))
    with pytest.raises(pyquant.FormatError, match="'missing' is listed"):
        TensorDir(str(bad))


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (lambda t: t.__setitem__(f"{Q}.qweight", t[f"{Q}.qweight"].float()), pyquant.DtypeError, "qweight"),
        (lambda t: t.__setitem__(f"{Q}.qzeros", t[f"{Q}.qzeros"][:, :1].contiguous()), pyquant.ShapeError, "qzeros"),
        (lambda t: t.__setitem__(f"{Q}.g_idx", t[f"{Q}.g_idx"] + 100), pyquant.FormatError, "g_idx values"),
        (lambda t: t.pop(f"{Q}.scales"), pyquant.FormatError, "scales"),
        (lambda t: t.pop("model.norm.weight"), pyquant.FormatError, "model.norm.weight"),
        (lambda t: t.__setitem__("model.extra", torch.zeros(2)), pyquant.FormatError, "model.extra"),
    ],
    ids=["dtype", "shape", "g_idx", "missing-layer-tensor", "missing-float", "unexpected"],
)
def test_bad_tensors_name_file_and_layer(gptq_dir, tmp_path, edit, error, match):
    bad = _copy(gptq_dir, tmp_path / "bad")
    _edit_tensors(bad, edit)
    with pytest.raises(error, match=match) as info:
        import_model(bad)
    if match not in ("model.norm.weight", "model.extra"):
        assert "model.safetensors" in str(info.value) and Q in str(info.value)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["quantization_config"].__setitem__("bits", 5), "bits must be 2, 3, 4 or 8"),
        (lambda c: c["quantization_config"].__setitem__("group_size", "x"), "group_size"),
        (lambda c: c["quantization_config"].__setitem__("checkpoint_format", "marlin"), "checkpoint_format"),
        (lambda c: c["quantization_config"].__setitem__("quant_method", "pyquant"), "load_quantized"),
        (lambda c: c["quantization_config"].__setitem__("quant_method", "fp8"), "'fp8'"),
        (lambda c: c.__setitem__("model_type", 3), "model_type"),
        (lambda c: c.__setitem__("num_hidden_layers", 1 << 20), "num_hidden_layers=1048576"),
        (lambda c: c.__setitem__("intermediate_size", 1 << 30), "config.json gives"),
    ],
)
def test_bad_config(gptq_dir, tmp_path, edit, match):
    bad = _copy(gptq_dir, tmp_path / "bad")
    _edit_config(bad, edit)
    with pytest.raises(pyquant.FormatError, match=match):
        import_model(bad)


def test_config_must_be_a_json_object(gptq_dir, tmp_path):
    bad = _copy(gptq_dir, tmp_path / "bad")
    (bad / "config.json").write_text("[1, 2]")
    with pytest.raises(pyquant.FormatError, match="config.json must be a JSON object"):
        import_model(bad)
    (bad / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(pyquant.FormatError, match="not valid UTF-8 JSON"):
        import_model(bad)


def test_header_sizes_never_drive_allocations():
    from pyquant.io import bnb as pq_bnb
    from pyquant.io import compressed_tensors as ct
    from pyquant.io import hqq as pq_hqq

    args = ct.WeightArgs({"num_bits": 4, "symmetric": True, "strategy": "channel"}, "t", "pack-quantized")
    huge = {"weight_packed": torch.zeros(2, 2, dtype=torch.int32), "weight_scale": torch.ones(2, 1),
            "weight_shape": torch.tensor([1 << 40, 1 << 40])}
    with pytest.raises(pyquant.FormatError, match="weight_packed for shape"):
        ct.import_layer(huge, args)
    state = {"W_q": torch.zeros(2, 2, dtype=torch.uint8), "nbits": torch.tensor(4), "group_size": torch.tensor(32),
             "shape": torch.tensor([1 << 40, 1 << 40]), "scale": torch.ones(2, 1), "zero": torch.ones(2, 1),
             "axis": torch.tensor(1)}
    with pytest.raises(pyquant.ShapeError, match="W_q"):
        pq_hqq.import_layer(state)
    blob = torch.tensor(list(b'{"quant_type": "nf4", "blocksize": 64, "shape": [1099511627776, 2]}'), dtype=torch.uint8)
    with pytest.raises(pyquant.ShapeError, match="bytes"):
        pq_bnb.import_layer({"weight": torch.zeros(4, 1, dtype=torch.uint8), "weight.absmax": torch.ones(1),
                             "weight.quant_state.bitsandbytes__nf4": blob})
    with pytest.raises(pyquant.FormatError, match="JSON"):
        pq_bnb.import_layer({"weight": torch.zeros(4, 1, dtype=torch.uint8), "weight.absmax": torch.ones(1),
                             "weight.quant_state.bitsandbytes__nf4": torch.tensor([1, 2, 3], dtype=torch.uint8)})


def test_sniffing(gptq_dir, tmp_path):
    assert sniff_format(gptq_dir) == "gptq"
    (tmp_path / "x.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(pyquant.FormatError, match="not GGUF"):
        sniff_format(tmp_path / "x.bin")
    with pytest.raises(pyquant.FormatError, match="no such file"):
        sniff_format(tmp_path / "nothing")
    with pytest.raises(pyquant.FormatError, match="unknown import format"):
        import_model(gptq_dir, format="onnx")
    with pytest.raises(pyquant.FormatError, match="no option"):
        import_model(gptq_dir, revision="main")


def test_export_is_atomic(tmp_path):
    model = quantized_copy(tiny_llama(layers=1), Int(4, 32, False))
    with pytest.raises(pyquant.FormatError, match="unknown export format"):
        export_model(model, tmp_path / "x", "onnx")
    with pytest.raises(pyquant.FormatError, match="no option"):
        export_model(model, tmp_path / "x", "awq", checkpoint_format="gptq")
    with pytest.raises(pyquant.FormatError, match="HQQ|Int"):
        export_model(quantized_copy(tiny_llama(layers=1), pyquant.NF4()), tmp_path / "x", "hqq")
    assert os.listdir(tmp_path) == []
    export_model(model, tmp_path / "x", "awq")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_model(model, tmp_path / "x", "awq")
    export_model(model, tmp_path / "x", "gptq", overwrite=True)
    assert sniff_format(tmp_path / "x") == "gptq"
    assert sorted(os.listdir(tmp_path)) == ["x"]
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "y") as tmp:
            open(os.path.join(tmp, "part"), "w").close()
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["x"]
    with pytest.raises(pyquant.FormatError, match="no QuantLinear"):
        export_model(tiny_llama(layers=1), tmp_path / "z", "gptq")
