"""pytest-benchmark view of the CPU kernels: each kernel next to its baseline
in the same session, so the saved comparison tables give ratios.

    python -m pytest benchmarks/test_bench_cpu.py --benchmark-only --benchmark-group-by=param:case

Not part of the unit-test run (``testpaths = tests``); the targets themselves are
checked by benchmarks/bench_cpu.py, which prints ratios.
"""
import pytest
import torch

import pyquant
from pyquant.formats import GGUF, NF4, Int

torch.set_num_threads(2)
K = N = 4096


def _weight():
    torch.manual_seed(0)
    return torch.randn(N, K) / K**0.5


CASES = {
    "int4_g128": Int(4, 128, False),
    "int8_g128": Int(8, 128, False),
    "nf4_b64": NF4(64),
    "q4_k": GGUF("Q4_K"),
    "q8_0": GGUF("Q8_0"),
}


@pytest.fixture(scope="module")
def weights():
    w = _weight()
    return w, {name: pyquant.quantize_weight(w, fmt) for name, fmt in CASES.items()}


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("case", ["dense_fp32", *CASES])
def test_qmatmul(benchmark, weights, case, m):
    w, qws = weights
    x = torch.randn(m, K)
    if case == "dense_fp32":
        benchmark(lambda: x @ w.T)
    else:
        benchmark(lambda: pyquant.qmatmul(x, qws[case]))


@pytest.mark.parametrize("case", ["q4_k", "q8_0"])
@pytest.mark.parametrize("impl", ["pyquant", "gguf_py"])
def test_gguf_dequantize(benchmark, weights, case, impl):
    _, qws = weights
    qw = qws[case]
    if impl == "pyquant":
        benchmark(lambda: pyquant.dequantize(qw, torch.float32))
    else:
        gguf = pytest.importorskip("gguf")
        raw = qw.tensors["blocks"].numpy()
        qtype = getattr(gguf.GGMLQuantizationType, qw.format.type)
        benchmark(lambda: gguf.quants.dequantize(raw, qtype))
