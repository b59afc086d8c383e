"""The method table: quantize_weight and QuantConfig read the same entries."""
import pytest
import torch

import pyquant
from pyquant import GGUF, NF4, Int, QuantConfig
from pyquant.errors import FormatError, ValueRangeError
from pyquant.methods import GGUF_FALLBACK, METHODS, get_method


def weight(n=16, k=256, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def same(a, b):
    return a.format == b.format and a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)


def test_one_entry_per_method_and_gguf_type():
    gguf = {t.lower() for t in pyquant.formats.BLOCK_TYPES}
    assert set(METHODS) == {"rtn", "hqq", "gptq", "awq", "nf4"} | gguf
    assert {n for n, m in METHODS.items() if m.needs_calibration} == {"gptq", "awq"}
    for name, m in METHODS.items():
        cfg = QuantConfig(name)
        assert cfg.needs_calibration == m.needs_calibration
        assert cfg.is_gguf == (name in gguf)
        assert cfg.format().family == m.formats[0]
        if name in gguf:
            assert cfg.format() == GGUF(name.upper())
    assert QuantConfig("nf4", group_size=64, nf4_double_quant=True).format() == NF4(64, True)


def test_config_rejects_an_unknown_method_or_bad_nf4_bits():
    with pytest.raises(FormatError, match="unknown quantization method 'q9_0'"):
        QuantConfig("q9_0")
    with pytest.raises(FormatError, match="4 bits"):
        QuantConfig("nf4", bits=3)
    assert "nf4 block 128" in QuantConfig("nf4").describe()


def test_quantize_weight_honours_the_hqq_zero_point():
    from pyquant.algorithms.hqq import hqq_quantize

    w, fmt = weight(), Int(4, 64)
    for zero in ("anchored", "integer", "float"):
        want = hqq_quantize(w, fmt, zero_point=zero)
        assert same(pyquant.quantize_weight(w, fmt, method="hqq", zero_point=zero), want)
    default = pyquant.quantize_weight(w, fmt, method="hqq")
    assert same(default, hqq_quantize(w, fmt, zero_point="anchored"))
    assert not same(default, pyquant.quantize_weight(w, fmt, method="hqq", zero_point="float"))


def test_quantize_weight_options_are_validated():
    w, fmt = weight(), Int(4, 64)
    with pytest.raises(FormatError, match="'zero_pt'"):
        pyquant.quantize_weight(w, fmt, method="hqq", zero_pt="float")
    with pytest.raises(FormatError, match="method 'rtn' has no option 'zero_point'.*takes none"):
        pyquant.quantize_weight(w, fmt, method="rtn", zero_point="float")
    with pytest.raises(ValueRangeError, match="zero_point"):
        pyquant.quantize_weight(w, fmt, method="hqq", zero_point="half")
    with pytest.raises(FormatError, match="unknown quantization method 'hqqq'"):
        pyquant.quantize_weight(w, fmt, method="hqqq")
    with pytest.raises(FormatError, match="'awq' needs calibration"):
        pyquant.quantize_weight(w, fmt, method="awq")


def test_config_method_kwargs_are_validated_by_the_same_table():
    assert QuantConfig("hqq", method_kwargs={"iters": 5}).method_options() == {"zero_point": "anchored", "iters": 5}
    assert QuantConfig("hqq", hqq_zero_point="float", method_kwargs={"zero_point": "integer"}).method_options() == {
        "zero_point": "integer"}
    with pytest.raises(FormatError, match="QuantConfig.method_kwargs: method 'hqq' has no option 'bogus'"):
        QuantConfig("hqq", method_kwargs={"bogus": 1})
    with pytest.raises(FormatError, match="'gptq' has no option 'damping'"):
        QuantConfig("gptq", method_kwargs={"damping": 0.1})


@pytest.mark.parametrize("method", ["q4_k", "q6_k", "q2_k"])
def test_gguf_methods_take_their_type_or_its_fallback(method):
    w = weight(k=320)
    fallback = GGUF(GGUF_FALLBACK[method.upper()])
    assert same(pyquant.quantize_weight(w, fallback, method=method), pyquant.quantize_weight(w, fallback))
    other = GGUF("Q8_0") if fallback.type != "Q8_0" else GGUF("Q4_1")
    with pytest.raises(FormatError, match=f"method '{method}' quantizes into GGUF {method.upper()}"):
        pyquant.quantize_weight(w, other, method=method)
    with pytest.raises(FormatError, match="gguf formats"):
        pyquant.quantize_weight(w, Int(4, 64), method=method)
    with pytest.raises(FormatError, match="int formats"):
        pyquant.quantize_weight(w, NF4(64), method="hqq")


def test_get_method_is_case_insensitive():
    assert get_method("Q4_K") is METHODS["q4_k"] and get_method("RTN") is METHODS["rtn"]
