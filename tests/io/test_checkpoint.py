"""pyquant checkpoints without transformers: round trips, shards, every broken file refused before
the model changes (naming the file and the tensor), and no float copy of a quantized weight on load."""
import json
import os
import pickle

import pytest
import torch
from torch import nn

from tests.deps import require
from tests.isolated_python import run_python

require("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

import pyquant  # noqa: E402
from pyquant.errors import FormatError  # noqa: E402
from pyquant.formats import GGUF, NF4, Int, QuantizedWeight  # noqa: E402
from pyquant.io import checkpoint, files  # noqa: E402
from pyquant.nn import QuantLinear  # noqa: E402


class Net(nn.Module):
    """Linears of several formats, a float head tied to the embedding, a norm."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 64)
        self.a = nn.Linear(64, 96)
        self.b = nn.Linear(96, 64, bias=False)
        self.c = nn.Linear(64, 64, bias=False)
        self.d = nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 40, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.b(torch.relu(self.a(h)))
        return self.head(self.norm(self.d(self.c(h))))


FORMATS = {"a": Int(4, 32, False), "b": Int(4, 32, False), "c": NF4(64), "d": GGUF("Q8_0")}


def quantized_net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    for name, fmt in FORMATS.items():
        setattr(net, name, QuantLinear.from_linear(getattr(net, name), fmt))
    return net.eval()


def skeleton():
    with torch.device("meta"):
        return Net()


@pytest.fixture
def saved(tmp_path):
    net = quantized_net()
    path = pyquant.save_quantized(net, tmp_path / "ckpt", method="rtn")
    return net, path


IDS = torch.arange(12).view(2, 6)


def test_round_trip_is_bit_exact_and_records_formats(saved):
    net, path = saved
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    qc = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "pyquant" and qc["format_version"] == checkpoint.FORMAT_VERSION
    assert qc["format"] == "int4_g32_asym_fp16" and qc["method"] == "rtn"
    assert qc["layers"] == {"c": "nf4_b64", "d": "gguf_q8_0"}  # only the layers that differ
    loaded = pyquant.load_quantized(path, model=skeleton())
    for name, fmt in FORMATS.items():
        mod = getattr(loaded, name)
        assert isinstance(mod, QuantLinear) and mod.qformat == fmt
        for t, ref in zip(mod.quantized_weight.tensor_list(), getattr(net, name).quantized_weight.tensor_list()):
            assert t.dtype == ref.dtype and torch.equal(t, ref)
    assert loaded.head.weight.data_ptr() == loaded.embed.weight.data_ptr()  # the tie survives
    assert torch.equal(loaded(IDS), net(IDS))


def test_shards_and_index(tmp_path):
    net = quantized_net()
    path = pyquant.save_quantized(net, tmp_path / "s", max_shard_size="10KB")
    files = sorted(os.listdir(path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and checkpoint.INDEX_FILE in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.load(open(os.path.join(path, checkpoint.INDEX_FILE)))
    assert set(index["weight_map"].values()) == set(shards)
    assert torch.equal(pyquant.load_quantized(path, model=skeleton())(IDS), net(IDS))


def test_loading_never_unpickles(saved, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("loading a checkpoint unpickled something")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, name, refuse)
    net, path = saved
    assert torch.equal(pyquant.load_quantized(path, model=skeleton())(IDS), net(IDS))


def test_save_refuses_float_model_and_existing_directory(tmp_path, saved):
    with pytest.raises(FormatError, match="no QuantLinear"):
        pyquant.save_quantized(Net(), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    _, path = saved
    with pytest.raises(FileExistsError, match="not empty"):
        pyquant.save_quantized(quantized_net(), path)
    pyquant.save_quantized(quantized_net(seed=1), path, overwrite=True)
    assert torch.equal(pyquant.load_quantized(path, model=skeleton())(IDS), quantized_net(seed=1)(IDS))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left behind


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        pyquant.save_quantized(quantized_net(), tmp_path / "out")
    assert os.listdir(tmp_path) == []


# --- broken checkpoints: one error naming file and tensor, the model untouched ---------------
def _rewrite(path, change):
    """Apply ``change(tensors) -> tensors`` to model.safetensors."""
    f = os.path.join(path, "model.safetensors")
    tensors = change(dict(load_file(f)))
    save_file(tensors, f, metadata={"format": "pt"})
    return f


def _edit_config(path, change):
    f = os.path.join(path, "config.json")
    cfg = json.load(open(f))
    change(cfg["quantization_config"])
    json.dump(cfg, open(f, "w"))
    return f


def _truncate(path):
    f = os.path.join(path, "model.safetensors")
    os.truncate(f, os.path.getsize(f) - 100)
    return f


def _set(key, value):
    def change(t):
        t[key] = value
        return t
    return change


def _drop(key):
    def change(t):
        del t[key]
        return t
    return change


def _spec_tensor(spec):
    return torch.tensor(list(spec.encode()), dtype=torch.uint8)


BROKEN = {
    "truncated shard": (_truncate, "model.safetensors", r"truncated shard"),
    "wrong dtype": (lambda p: _rewrite(p, _set("a.scales", torch.zeros(96, 2, dtype=torch.float32))),
                    "model.safetensors", r"tensor 'a.scales': dtype torch.float32"),
    "wrong shape": (lambda p: _rewrite(p, _set("a.qweight", torch.zeros(96, 16, dtype=torch.uint8))),
                    "model.safetensors", r"tensor 'a.qweight': shape \(96, 16\)"),
    "missing tensor": (lambda p: _rewrite(p, _drop("c.absmax")), "model.safetensors",
                       r"missing tensor 'c.absmax'"),
    "missing float tensor": (lambda p: _rewrite(p, _drop("norm.bias")), "model.safetensors",
                             r"missing tensor 'norm.bias'"),
    "unknown format": (lambda p: _rewrite(p, _set("d.format", _spec_tensor("int5_g7_fp16"))),
                       "model.safetensors", r"tensor 'd.format'.*unknown format spec 'int5_g7_fp16'"),
    "config disagrees": (lambda p: _edit_config(p, lambda qc: qc["layers"].pop("c")),
                         "model.safetensors", r"tensor 'c.format' is 'nf4_b64' but .*says 'int4_g32_asym_fp16'"),
    "unknown format in config": (lambda p: _edit_config(p, lambda qc: qc.update(format="int4_gX")),
                                 "config.json", r"quantization_config.format: unknown format spec 'int4_gX'"),
    "config names a missing layer": (lambda p: _edit_config(p, lambda qc: qc["layers"].update(zz="nf4_b64")),
                                     "config.json", r"names 'zz' but there is no tensor 'zz.format'"),
    "shape disagrees with format": (lambda p: _rewrite(p, _set("b.shape", torch.tensor([64, 64]))),
                                    "model.safetensors", r"tensor 'b.qweight': shape \(64, 48\)"),
    "unexpected tensor": (lambda p: _rewrite(p, _set("extra.weight", torch.zeros(3))),
                          "model.safetensors", r"tensor 'extra.weight': the model has no parameter"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_is_refused_before_the_model_changes(saved, case):
    _, path = saved
    breaker, file_name, pattern = BROKEN[case]
    breaker(path)
    torch.manual_seed(3)
    target = Net()  # a real model: after the error it must be exactly as it was
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(FormatError, match=pattern) as info:
        pyquant.load_quantized(path, model=target)
    assert file_name in str(info.value)
    assert not any(isinstance(m, QuantLinear) for m in target.modules())
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_model_that_does_not_fit_is_refused(saved):
    _, path = saved
    target = Net()
    target.b = nn.Linear(80, 64, bias=False)
    with pytest.raises(FormatError, match=r"config.json: tensor 'b.shape' is \(64, 96\), the model's b is \(64, 80\)"):
        pyquant.load_quantized(path, model=target)
    target = Net()
    target.c = nn.Conv1d(1, 1, 1)
    with pytest.raises(FormatError, match=r"tensor 'c.format' quantizes 'c', the model has Conv1d there"):
        pyquant.load_quantized(path, model=target)
    assert not any(isinstance(m, QuantLinear) for m in target.modules())


def test_missing_tensor_in_a_sharded_checkpoint_names_the_index(tmp_path):
    path = pyquant.save_quantized(quantized_net(), tmp_path / "s", max_shard_size="10KB")
    index_path = os.path.join(path, checkpoint.INDEX_FILE)
    index = json.load(open(index_path))
    shard = index["weight_map"]["c.absmax"]
    tensors = dict(load_file(os.path.join(path, shard)))
    del tensors["c.absmax"]
    save_file(tensors, os.path.join(path, shard), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=rf"{checkpoint.INDEX_FILE}: missing tensor 'c.absmax': the index puts "
                                          rf"it in {shard}"):
        pyquant.load_quantized(path, model=skeleton())
    del index["weight_map"]["c.absmax"]
    json.dump(index, open(index_path, "w"))
    with pytest.raises(FormatError, match=rf"{checkpoint.INDEX_FILE}: missing tensor 'c.absmax' of nf4_b64 layer 'c'"):
        pyquant.load_quantized(path, model=skeleton())


def test_hostile_index_and_header(saved, tmp_path):
    _, path = saved
    index = os.path.join(path, checkpoint.INDEX_FILE)
    json.dump({"weight_map": {"a.qweight": "../../etc/passwd"}}, open(index, "w"))
    with pytest.raises(FormatError, match="not a shard file in this directory"):
        checkpoint.read_checkpoint(path)
    os.remove(index)
    f = os.path.join(path, "model.safetensors")
    with open(f, "r+b") as fh:  # a header length far past the end of the file
        fh.write((2**40).to_bytes(8, "little"))
    with pytest.raises(FormatError, match="header length .* does not fit"):
        checkpoint.read_checkpoint(path)


def test_missing_directory_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        pyquant.load_quantized(tmp_path / "nope", model=Net())
    (tmp_path / "f").write_text("x")
    with pytest.raises(FormatError, match="is a file"):
        pyquant.load_quantized(tmp_path / "f", model=Net())
    with pytest.raises(FormatError, match="no config.json"):
        pyquant.load_quantized(tmp_path, model=Net())


def test_parse_size():
    assert files.parse_size("2GB") == 2 * 10**9 and files.parse_size("1GiB") == 2**30
    assert files.parse_size(123) == 123
    with pytest.raises(FormatError, match="max_shard_size"):
        files.parse_size("lots")


# --- memory: the packed tensors, never a float copy of the weights ---------------------------
def write_big_packed(path, n_layers=4, dim=4096):
    """A checkpoint of ``n_layers`` int4 g128 (dim x dim) layers with random packed tensors
    (nothing is quantized: the test is about bytes)."""
    fmt = Int(4, 128, False)
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(n_layers):
        tensors = {}
        for name, (shape, dtype) in fmt.tensor_specs((dim, dim)).items():
            if dtype == torch.uint8:
                tensors[name] = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
            else:
                tensors[name] = (torch.rand(shape, generator=gen) + 0.5).to(dtype)
        layers.append(QuantLinear(QuantizedWeight(fmt, tensors, (dim, dim))))
    pyquant.save_quantized(nn.Sequential(*layers), path)
    return n_layers * dim * dim * 4  # bytes of the float32 weights


PEAK_RSS = """
import os

def _status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

def reset_peak():
    # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")

def peak():
    return _status("VmHWM")
"""


def peak_rss_script(body: str) -> str:
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("measuring peak RSS needs Linux's /proc/self/clear_refs")
    return PEAK_RSS + body


def test_load_peak_memory_is_the_packed_size(tmp_path):
    float_bytes = write_big_packed(tmp_path / "big")
    r = run_python(peak_rss_script(
        f"""
import torch, pyquant
from torch import nn
with torch.device("meta"):
    model = nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(4)])
before = reset_peak()
pyquant.load_quantized({str(tmp_path / 'big')!r}, model=model)
packed = sum(m.quantized_weight.nbytes for m in model)
print(peak() - before, packed)
"""))
    assert r.returncode == 0, r.stderr
    grown, packed = (int(v) for v in r.stdout.split())
    # The packed tensors are ~1/7 of the float weights; a float copy of even one layer (64 MiB)
    # would push the growth past the bound.
    assert packed // 2 < grown < packed + float_bytes // 8, (grown, packed, float_bytes)
