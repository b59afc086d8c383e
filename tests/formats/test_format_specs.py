"""Format specs and state-dict round trips across all format families; bad specs."""
import pytest
import torch

import pyquant
from pyquant.formats import GGUF, NF4, Int, QuantizedWeight, format_from_spec


@pytest.mark.parametrize(
    "fmt",
    [Int(4, 128), Int(2, -1, True, torch.float32, True), NF4(64), NF4(4096, True), GGUF("Q4_K"), GGUF("q8_0")],
    ids=str,
)
def test_spec_roundtrip(fmt):
    assert format_from_spec(fmt.spec()) == fmt


@pytest.mark.parametrize("spec", ["", "int4", "int4_g100_asym_fp16", "int5_g128_asym_fp16", "nf4_b48", "gguf_q9_k", "fp8"])
def test_bad_specs(spec):
    with pytest.raises(pyquant.FormatError):
        format_from_spec(spec)
    with pytest.raises(pyquant.FormatError):
        format_from_spec(None)


def test_gguf_bad_type():
    with pytest.raises(pyquant.FormatError, match="IQ2_XS"):
        GGUF("IQ2_XS")


@pytest.mark.parametrize("fmt", [Int(4, 64), NF4(64, True), GGUF("Q8_0")], ids=str)
def test_state_dict_roundtrip_every_family(fmt):
    torch.manual_seed(0)
    qw = pyquant.quantize_weight(torch.randn(8, 256), fmt)
    back = QuantizedWeight.from_state_dict(qw.state_dict("w."), "w.")
    assert back.format == fmt
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_from_state_dict_bad_input():
    qw = pyquant.quantize_weight(torch.randn(8, 64), Int(4, 32))
    sd = qw.state_dict()
    with pytest.raises(pyquant.FormatError, match="'format'"):
        QuantizedWeight.from_state_dict({k: v for k, v in sd.items() if k != "format"})
    with pytest.raises(pyquant.FormatError, match="uint8"):
        QuantizedWeight.from_state_dict(dict(sd, format=sd["format"].int()))
    with pytest.raises(pyquant.FormatError, match="UTF-8"):
        QuantizedWeight.from_state_dict(dict(sd, format=torch.tensor([0xFF, 0xFE], dtype=torch.uint8)))
    with pytest.raises(pyquant.FormatError, match="unknown format"):
        QuantizedWeight.from_state_dict(dict(sd, format=torch.tensor(list(b"zzz"), dtype=torch.uint8)))
    with pytest.raises(pyquant.FormatError, match="2 values"):
        QuantizedWeight.from_state_dict(dict(sd, shape=torch.tensor([8, 64, 1])))
    with pytest.raises(pyquant.FormatError, match="'scales'"):
        QuantizedWeight.from_state_dict({k: v for k, v in sd.items() if k != "scales"})
    with pytest.raises(pyquant.ShapeError):
        QuantizedWeight.from_state_dict(dict(sd, shape=torch.tensor([8, 96])))


def test_quantized_weight_to_and_repr():
    qw = pyquant.quantize_weight(torch.randn(4, 64), NF4())
    assert "nf4_b64" in repr(qw) and "bits/weight" in repr(qw)
    moved = qw.to("cpu")
    assert moved.device.type == "cpu" and moved.shape == qw.shape
