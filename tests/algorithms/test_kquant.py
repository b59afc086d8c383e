"""k-quant quantizers (GGUF Q2_K..Q6_K): byte-exact with llama.cpp, sane error,
the importance matrix helping where it should, bad input rejected.

The fixture tests/fixtures/kquant/kquant_llamacpp.npz holds fp32 rows of
varied distributions, three importance vectors and the bytes llama.cpp's
``quantize_qX_K`` wrote for them (provenance in its ``meta`` entry).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pyquant
from pyquant.algorithms.kquant import imatrix_from_activations, kquant_quantize
from pyquant.ops.reference.kquant import nearest_int, quantize_k_blocks, sqrt_rn
from pyquant.errors import DeviceError, DtypeError, FormatError, KernelUnavailableError, ShapeError, ValueRangeError
from pyquant.formats import GGUF

from tests.conftest import sqnr
from tests.gguf_testutil import K_TYPES, assert_bitexact, gguf_dequantize_np

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kquant" / "kquant_llamacpp.npz"


def _has_cpu_kernel() -> bool:
    ext = pyquant._ext.load()
    return ext is not None and hasattr(ext, "kquant_quantize")


KERNELS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not _has_cpu_kernel(), reason="no pyquant._C"))]


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _blocks(w, t, imatrix=None, kernel="auto"):
    return kquant_quantize(w, GGUF(t), imatrix, kernel=kernel).tensors["blocks"]


# --- byte-exact against llama.cpp -----------------------------------------------------
def test_fixture_provenance(fixture):
    meta = json.loads(str(fixture["meta"]))
    assert "ggml-quants.c" in meta["source"] and "no FMA" in meta["compiler"]
    assert fixture["w"].shape == (12, 768) and fixture["imatrix"].shape == (3, 768)
    assert FIXTURE.stat().st_size < 300_000


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("type_name", K_TYPES)
def test_bytes_match_llamacpp(fixture, type_name, kernel):
    w = torch.from_numpy(fixture["w"])
    expected = torch.from_numpy(fixture[f"{type_name}_ref"])
    assert_bitexact(_blocks(w, type_name, kernel=kernel), expected, f"{type_name} ref")
    for i, im in enumerate(fixture["imatrix"]):
        got = _blocks(w, type_name, torch.from_numpy(im), kernel=kernel)
        assert_bitexact(got, torch.from_numpy(fixture[f"{type_name}_imatrix"][i]), f"{type_name} imatrix #{i}")


@pytest.mark.skipif(not _has_cpu_kernel(), reason="no pyquant._C")
@pytest.mark.parametrize("type_name", K_TYPES)
def test_cpu_kernel_matches_spec_random(type_name):
    # Rows of very different scales (fp16 subnormal scales included), shapes
    # the fixture does not have, imatrices with zeros; one chunk of the spec.
    g = torch.Generator().manual_seed(sum(map(ord, type_name)))
    n, k = 6, 1024
    scale = torch.exp(torch.empty(n, 1).uniform_(-12, 4, generator=g))
    w = torch.randn(n, k, generator=g) * scale
    w[1] = torch.distributions.StudentT(1.5).sample((k,)) * 0.1
    w[2, ::3] = 0.0
    w[3] = w[3].abs()
    im = torch.rand(k, generator=g) ** 3 * (torch.rand(k, generator=g) > 0.2)
    for imatrix in (None, im):
        spec = _blocks(w, type_name, imatrix, kernel="reference")
        what = f"{type_name} imatrix={imatrix is not None}"
        assert_bitexact(_blocks(w, type_name, imatrix, kernel="cpu"), spec, what)


def test_spec_chunking_is_invisible(monkeypatch):
    from pyquant.ops.backends import reference as reference_backend

    w = torch.randn(3, 768, generator=torch.Generator().manual_seed(5))
    whole = _blocks(w, "Q4_K", kernel="reference")
    monkeypatch.setattr(reference_backend, "KQUANT_CHUNK", 2)
    assert_bitexact(_blocks(w, "Q4_K", kernel="reference"), whole, "chunked")


# --- building blocks of the spec ---------------------------------------------------------
def test_nearest_int_is_the_magic_number_rounding():
    v = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3.49999, -7.5, 4194303.0, 0.0, -0.0], dtype=torch.float32)
    assert nearest_int(v).tolist() == [0.0, 2.0, 2.0, 0.0, -2.0, 3.0, -8.0, 4194303.0, 0.0, 0.0]
    # Outside +-2**22 the trick wraps; llama.cpp keeps (and clamps) that value.
    big = torch.tensor([1e10, float("inf"), float("nan")], dtype=torch.float32)
    bits = (big.numpy() + np.float32(12582912.0)).view(np.int32)
    assert nearest_int(big).tolist() == ((bits & 0x7FFFFF) - 0x400000).astype(np.float32).tolist()


def test_sqrt_rn_is_correctly_rounded():
    g = np.random.default_rng(0)
    a = np.abs(g.standard_normal(20000) * np.exp(g.uniform(-100, 80, 20000))).astype(np.float32)
    a[:6] = [0.0, 1e-45, 1.0, 2.0, 3.4e38, 1.1754942e-38]
    got = sqrt_rn(torch.from_numpy(a)).numpy()
    assert np.array_equal(got.view(np.int32), np.sqrt(a).view(np.int32))


# --- accuracy ------------------------------------------------------------------------------
SQNR_FLOOR = {"Q2_K": 9.5, "Q3_K": 15.0, "Q4_K": 21.5, "Q5_K": 27.5, "Q6_K": 33.5}


@pytest.mark.parametrize("type_name", K_TYPES)
def test_error_sane_and_imatrix_helps(type_name):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 1024, generator=g)
    imp = torch.exp(torch.randn(1024, generator=g) * 2)
    fmt = GGUF(type_name)
    plain = kquant_quantize(w, fmt)
    weighted = kquant_quantize(w, fmt, imp)
    d0 = fmt.decode(plain.tensors, w.shape)
    d1 = fmt.decode(weighted.tensors, w.shape)
    assert sqnr(w, d0) > SQNR_FLOOR[type_name], f"{type_name}: SQNR {sqnr(w, d0):.2f} dB"
    assert sqnr(w, d1) > SQNR_FLOOR[type_name] - 1.5, f"{type_name} imatrix: SQNR {sqnr(w, d1):.2f} dB"
    e0 = float(((w - d0) ** 2 * imp).sum())
    e1 = float(((w - d1) ** 2 * imp).sum())
    assert e1 < 0.8 * e0, f"{type_name}: importance-weighted error {e1:.4g} with imatrix vs {e0:.4g} without"


def test_imatrix_from_calibration_activations():
    g = torch.Generator().manual_seed(2)
    k = 512
    # Channels with larger activations matter more; an imatrix from them should
    # cut the output error of x @ W^T.
    chan = torch.exp(torch.randn(k, generator=g) * 1.5)
    x = torch.randn(256, k, generator=g) * chan
    im = imatrix_from_activations(x[:128])
    im = imatrix_from_activations(x[128:], im)
    assert torch.allclose(im, (x.double() ** 2).sum(0).float(), rtol=1e-6)
    w = torch.randn(64, k, generator=g)
    fmt = GGUF("Q3_K")
    y = x @ w.t()
    err = []
    for imatrix in (None, im):
        dq = fmt.decode(kquant_quantize(w, fmt, imatrix).tensors, w.shape)
        err.append(float((y - x @ dq.t()).norm()))
    assert err[1] < 0.9 * err[0], f"output error {err[1]:.4g} with imatrix vs {err[0]:.4g} without"


# --- public entry points --------------------------------------------------------------------
@pytest.mark.parametrize("type_name", ["Q2_K", "Q4_K", "Q6_K"])
def test_quantize_weight_round_trip(type_name):
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(3))
    fmt = GGUF(type_name)
    qw = pyquant.quantize_weight(w, fmt)
    assert tuple(qw.shape) == (16, 512)
    assert_bitexact(qw.tensors["blocks"], _blocks(w, type_name), "quantize_weight vs kquant_quantize")
    back = pyquant.dequantize(qw, torch.float32)
    assert_bitexact(back, gguf_dequantize_np(type_name, qw.tensors["blocks"]), "pyquant.dequantize vs gguf-py")
    assert sqnr(w, back) > SQNR_FLOOR[type_name]


def test_half_precision_weight_is_quantized_as_fp32():
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    assert_bitexact(_blocks(w, "Q5_K"), _blocks(w.float(), "Q5_K"), "bf16 input")


def test_spec_entry_point_rejects_other_types():
    with pytest.raises(FormatError, match="Q8_0"):
        quantize_k_blocks("Q8_0", torch.zeros(1, 256))


# --- bad input ----------------------------------------------------------------------------
def test_bad_input():
    w = torch.randn(4, 512)
    fmt = GGUF("Q4_K")
    with pytest.raises(ShapeError, match="256"):
        kquant_quantize(torch.randn(4, 300), fmt)
    with pytest.raises(ShapeError, match="256"):
        pyquant.quantize_weight(torch.randn(4, 300), fmt)
    bad = w.clone()
    bad[1, 7] = float("nan")
    with pytest.raises(ValueRangeError, match="NaN"):
        kquant_quantize(bad, fmt)
    bad[1, 7] = float("inf")
    with pytest.raises(ValueRangeError):
        pyquant.quantize_weight(bad, fmt)
    with pytest.raises(ShapeError, match="2-D"):
        kquant_quantize(torch.randn(512), fmt)
    with pytest.raises(DtypeError):
        kquant_quantize(w.to(torch.int32), fmt)
    with pytest.raises(FormatError, match="k-quant"):
        kquant_quantize(w, GGUF("Q4_0"))
    with pytest.raises(FormatError):
        kquant_quantize(w, pyquant.formats.NF4())
    with pytest.raises(KernelUnavailableError, match="kquant_quantize"):
        kquant_quantize(w, fmt, kernel="triton")


def test_bad_imatrix():
    w = torch.randn(4, 512)
    fmt = GGUF("Q3_K")
    with pytest.raises(ShapeError, match="512"):
        kquant_quantize(w, fmt, torch.ones(256))
    with pytest.raises(ShapeError):
        kquant_quantize(w, fmt, torch.ones(1, 512))
    neg = torch.ones(512)
    neg[10] = -1.0
    with pytest.raises(ValueRangeError, match="index 10"):
        kquant_quantize(w, fmt, neg)
    nan = torch.ones(512)
    nan[3] = float("nan")
    with pytest.raises(ValueRangeError, match="NaN"):
        kquant_quantize(w, fmt, nan)
    with pytest.raises(DtypeError):
        kquant_quantize(w, fmt, torch.ones(512, dtype=torch.int64))
    with pytest.raises(DeviceError):
        kquant_quantize(w, fmt, torch.ones(512, device="meta"))
    with pytest.raises(ShapeError):
        imatrix_from_activations(torch.randn(8, 512), torch.ones(3))


def test_scale_overflowing_fp16_is_an_error():
    w = torch.randn(2, 512)
    w[1, 300] = 5e6  # Q2_K's d = max_scale/15 > 65504
    with pytest.raises(ValueRangeError, match=r"row 1, columns 256\.\.511"):
        kquant_quantize(w, GGUF("Q2_K"))


def test_forced_cpu_kernel_unavailable(monkeypatch):
    monkeypatch.setattr(pyquant._ext, "load", lambda: None)
    with pytest.raises(KernelUnavailableError):
        kquant_quantize(torch.randn(2, 256), GGUF("Q6_K"), kernel="cpu")
    # kernel="auto" falls back to the spec.
    assert kquant_quantize(torch.randn(2, 256), GGUF("Q6_K")).tensors["blocks"].shape == (2, 210)
