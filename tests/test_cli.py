"""The ``pyquant`` command line: quantize, eval, bench, inspect; every failure one line on stderr,
a non-zero exit and nothing half-written."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from tests.deps import require, smollm2_gguf

transformers = require("transformers")
require("safetensors")

import pyquant  # noqa: E402
from pyquant import cli  # noqa: E402
from pyquant.nn import QuantLinear  # noqa: E402

TEXT = " ".join(f"word{i % 37} and more{i % 11} text" for i in range(3000))


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [w for w, _ in Counter(TEXT.split()).most_common(120)]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny float Llama with a tokenizer, as a transformers directory."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("models") / "tiny"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(TEXT)
    return path


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_quantize_rtn_is_what_quantize_model_gives(model_dir, tmp_path, capsys):
    rc, out, err = run(["quantize", model_dir, "--method", "rtn", "--bits", "4", "--group-size", "32",
                        "--out", tmp_path / "q"], capsys)
    assert rc == 0, err
    for what in ("| pyquant quantize", "| quantized layers | 14", "bits/weight", "| minutes", "on disk"):
        assert what in out
    assert "| quantize_model" in err  # the progress side: bar and the pipeline's summary on stderr
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "q")("word1 and")["input_ids"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    pyquant.quantize_model(ref, pyquant.QuantConfig("rtn", bits=4, group_size=32), None, progress=False)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)
    qc = json.load(open(tmp_path / "q" / "config.json"))["quantization_config"]
    assert qc["method"] == "rtn" and qc["format"] == "int4_g32_asym_fp16"


def test_quantize_gptq_with_calibration_file_then_eval_and_inspect(model_dir, text_file, tmp_path, capsys):
    out_dir = tmp_path / "g"
    rc, out, err = run(["quantize", model_dir, "--method", "gptq", "--group-size", "32", "--calib", text_file,
                        "--samples", "4", "--seq-len", "32", "--out", out_dir, "--verbose"], capsys)
    assert rc == 0, err
    assert "model.layers.0.self_attn.q_proj" in err  # --verbose: a line per layer
    assert json.load(open(out_dir / "config.json"))["quantization_config"]["method"] == "gptq"
    assert any(isinstance(m, QuantLinear) for m in pyquant.load_quantized(out_dir).modules())

    rc, out, err = run(["eval", out_dir, "--compare", model_dir, "--text", text_file, "--segments", "2",
                        "--seq-len", "32"], capsys)
    assert rc == 0, err
    rows = [line for line in out.splitlines() if line.startswith(f"| {out_dir}") or line.startswith(f"| {model_dir}")]
    assert len(rows) == 2 and rows[1].rstrip(" |").endswith("1.000x")
    ppl = [float(r.split("|")[3]) for r in rows]
    assert all(1 < p < 1000 for p in ppl)

    rc, out, err = run(["inspect", out_dir], capsys)
    assert rc == 0, err
    assert "pyquant checkpoint (method gptq, 14 quantized layers)" in out
    assert "| model.layers.0.mlp.down_proj" in out and "int4_g32_asym_fp16_actorder" in out
    rc, out, _ = run(["inspect", out_dir, "--json"], capsys)
    rows = json.loads(out)["tensors"]
    assert {r["name"] for r in rows if r["format"].startswith("int4")} >= {"model.layers.1.self_attn.v_proj"}


def test_inspect_gguf_and_float_safetensors(model_dir, capsys):
    rc, out, err = run(["inspect", model_dir], capsys)
    assert rc == 0, err
    assert "no pyquant quantization_config" in out and "| model.norm.weight" in out and "float32" in out
    rc, out, err = run(["inspect", smollm2_gguf()], capsys)
    assert rc == 0, err
    assert "GGUF (architecture llama" in out and "| blk.0.attn_q.weight" in out and "q4_1" in out.lower()


def test_bench_calls_the_suite_thinly(tmp_path, monkeypatch, capsys):
    suite = tmp_path / "suite.py"
    suite.write_text("import json\ndef main(argv):\n    print(json.dumps(argv))\n    return 0\n")
    monkeypatch.setattr(cli, "SUITE", suite)
    rc, out, _ = run(["bench", "--device", "cpu", "--quick", "--out", tmp_path], capsys)
    assert rc == 0 and json.loads(out) == ["--device", "cpu", "--quick", "--out", str(tmp_path)]
    monkeypatch.setattr(cli, "SUITE", tmp_path / "missing.py")
    rc, _, err = run(["bench"], capsys)
    assert rc == 1 and "source checkout" in err


def test_the_real_suite_is_where_bench_looks():
    assert cli.SUITE.is_file() and "def main(argv" in cli.SUITE.read_text()


# --- failures: one line, non-zero, nothing written ------------------------------------------
def _one_line_error(rc, err, code, *needles, progress_before=False):
    """The error is one line; only a failure after the work began has the progress output above it."""
    assert rc == code
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("pyquant ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert progress_before or len(lines) == 1, err
    for n in needles:
        assert n in errors[0], errors[0]


def test_errors_are_one_line_and_write_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run(["quantize", tmp_path / "missing", "--method", "rtn", "--out", out], capsys)
    _one_line_error(rc, err, 1, "missing: no such file or directory")
    rc, _, err = run(["quantize", model_dir, "--method", "magic", "--out", out], capsys)
    _one_line_error(rc, err, 2, "invalid choice: 'magic'")
    rc, _, err = run(["quantize", model_dir, "--method", "rtn", "--bits", "5", "--out", out], capsys)
    _one_line_error(rc, err, 1, "bits")
    rc, _, err = run(["quantize", model_dir, "--method", "rtn", "--calib", tmp_path / "none.txt", "--out", out],
                     capsys)
    _one_line_error(rc, err, 1, "none.txt: no such calibration file")
    rc, _, err = run(["quantize", model_dir, "--method", "rtn", "--bits", "3", "--format", "awq", "--out", out], capsys)
    _one_line_error(rc, err, 1, "AWQ", progress_before=True)  # refused by the exporter, after the work
    unsupported = tmp_path / "weird"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    rc, _, err = run(["quantize", unsupported, "--method", "rtn", "--out", out], capsys)
    _one_line_error(rc, err, 1, "no-such-architecture")
    assert sorted(os.listdir(tmp_path)) == ["weird"]  # no output, no temporary directory


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_export_formats_load_back(model_dir, tmp_path, capsys, fmt):
    from pyquant.io.exchange import import_model

    out = tmp_path / "out"
    out.mkdir()  # an empty directory is a valid target, as for --format pyquant
    rc, _, err = run(["quantize", model_dir, "--method", "gptq", "--group-size", "32", "--format", fmt,
                      "--out", out], capsys)
    assert rc == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == fmt
    model = import_model(out)
    assert any(type(m).__name__ == "QuantLinear" for m in model.modules())
    rc, _, err = run(["quantize", model_dir, "--method", "rtn", "--format", fmt, "--out", out], capsys)
    _one_line_error(rc, err, 1, "exists and is not empty", "--force")


def test_existing_output_is_kept_unless_forced(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run(["quantize", model_dir, "--method", "rtn", "--out", out], capsys)
    _one_line_error(rc, err, 1, "exists and is not empty", "--force")
    assert os.listdir(out) == ["keep.txt"]
    rc, _, err = run(["quantize", model_dir, "--method", "rtn", "--group-size", "32", "--out", out, "--force"], capsys)
    assert rc == 0, err
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_interrupted_quantization_leaves_nothing(model_dir, tmp_path, capsys, monkeypatch):
    def crash(*a, **k):
        raise RuntimeError("power cut while writing")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", crash)
    rc, _, err = run(["quantize", model_dir, "--method", "rtn", "--group-size", "32", "--out", tmp_path / "o"], capsys)
    _one_line_error(rc, err, 1, "power cut", progress_before=True)
    assert os.listdir(tmp_path) == []


def test_python_m_pyquant_exits_non_zero_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pyquant", "inspect", str(tmp_path / "nothing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == f"pyquant inspect: error: {tmp_path / 'nothing'}: no such file or directory"
