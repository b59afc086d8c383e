"""Rows of x, and rows of the weight, never leak into each other's outputs.

The CPU kernels share passes between rows (GEMV row blocks, tiles, eight-lane
reads of per-row sums and scales), so a lane read one row too far is easy to
miss: with finite inputs it only multiplies a masked-off zero. An Inf or NaN
makes it visible: 0 * Inf is NaN. Here one row of x (or one row of scales)
holds Infs and every other output must stay finite and equal to the product
taken without that row.
"""
from __future__ import annotations

import pytest
import torch

import pyquant
from pyquant import _ext
from pyquant.formats import GGUF, NF4, Int
from pyquant.ops.backends.cpu_activations import cpu_activations

pytestmark = pytest.mark.skipif(_ext.load() is None, reason="needs pyquant._C")

LEVELS = tuple(_ext.simd_levels())
FORMATS = {
    "int4_g128": (Int(4, 128, False), 1152),
    "int4_g256": (Int(4, 256, False), 1152),
    "int3_g64": (Int(3, 64, False), 576),
    "int8_pc": (Int(8, -1, True), 576),
    "int2_g128_sym": (Int(2, 128, True), 1152),
    "nf4_b64": (NF4(64), 576),
    "q4_0": (GGUF("Q4_0"), 576),
    "q8_0": (GGUF("Q8_0"), 384),
    "q4_k": (GGUF("Q4_K"), 1280),
    "q6_k": (GGUF("Q6_K"), 768),
}


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert torch.isfinite(got).all(), f"{what}: non-finite outputs"
    tol = 1e-4 * float(want.abs().max()) + 1e-6
    err = float((got.double() - want.double()).abs().max())
    assert err <= tol, f"{what}: max error {err:.3g} (tol {tol:.3g})"


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("mode", ("int8", "fp32"))
def test_an_infinite_row_of_x_stays_in_its_row(name, mode):
    fmt, k = FORMATS[name]
    qw = pyquant.quantize_weight(torch.randn(12, k, generator=torch.Generator().manual_seed(1)), fmt)
    g = torch.Generator().manual_seed(2)
    for m in (2, 3, 4, 5, 8, 9, 17, 40, 400):
        x = torch.randn(m, k, generator=g)
        bad = int(torch.randint(0, m, (1,), generator=g))
        x[bad, torch.randint(0, k, (3,), generator=g)] = float("inf")
        keep = [i for i in range(m) if i != bad]
        for level in LEVELS:
            with _ext.cpu_simd(level), cpu_activations(mode):
                y = pyquant.qmatmul(x, qw, kernel="cpu")
                want = pyquant.qmatmul(x[keep], qw, kernel="cpu")
            _close(y[keep], want, f"{name} {mode} {level} M={m} inf row {bad}")


@pytest.mark.parametrize("name", [n for n in FORMATS if not n.startswith("q")])
@pytest.mark.parametrize("mode", ("int8", "fp32"))
def test_an_infinite_weight_row_stays_in_its_column(name, mode):
    fmt, k = FORMATS[name]
    qw = pyquant.quantize_weight(torch.randn(12, k, generator=torch.Generator().manual_seed(3)), fmt)
    scales = qw.tensors["absmax" if isinstance(fmt, NF4) and "absmax" in qw.tensors else "scales"]
    want_cols = [c for c in range(12) if c != 5]
    ref = {}
    g = torch.Generator().manual_seed(4)
    xs = {m: torch.randn(m, k, generator=g) for m in (1, 2, 4, 9)}
    for m, x in xs.items():
        for level in LEVELS:
            with _ext.cpu_simd(level), cpu_activations(mode):
                ref[m, level] = pyquant.qmatmul(x, qw, kernel="cpu")[:, want_cols]
    rows = scales.shape[0]  # Int: 12 rows of group scales; NF4: 108 block scales, 9 a row (K = 576, bs 64)
    scales.view(rows, -1)[5 * rows // 12] = float("inf")  # row 5's: every group, or its first block
    for m, x in xs.items():
        for level in LEVELS:
            with _ext.cpu_simd(level), cpu_activations(mode):
                y = pyquant.qmatmul(x, qw, kernel="cpu")
            _close(y[:, want_cols], ref[m, level], f"{name} {mode} {level} M={m}")
