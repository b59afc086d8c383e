"""The CPU benchmark's candidates compute the product they are timed for: each
against the dense fp32 product on the same x, at a shape torch's int4 kernel
takes (K a multiple of the group, N of 16) and where it cannot (SmolLM2's
ragged K = 576, or N = 24): there the run goes on without that baseline."""
import pytest
import torch

from pyquant import _ext
from tests.benchmarks import load_benchmark

pytestmark = pytest.mark.skipif(_ext.load() is None, reason="pyquant._C not built")


@pytest.mark.parametrize("fmt,n,k", [("int4_g128", 32, 256), ("int4_g128", 24, 256), ("int4_g128", 32, 576),
                                     ("nf4_b64", 32, 576), ("q4_0", 32, 576)])
def test_candidates_compute_the_product(fmt, n, k):
    B = load_benchmark("bench_cpu")
    p = B.Problem(fmt, n, k)
    torch_int4 = (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and fmt.startswith("int4")
                  and k % 128 == 0 and n % 16 == 0)
    assert (p.int4 is not None) == torch_int4
    fns, x, _ = B.candidates(p, 3, 1, p.copies(0))
    assert ("torch_int4" in fns) == torch_int4
    assert ("pyquant_bf16" in fns) == fmt.startswith("int4")
    want = x.double() @ p.dense.double().T
    for name, fn in fns.items():
        y = fn().double()
        # bf16 x (and int8 planes of x) carry bf16-level error; GGUF quantizes x to Q8_0
        tol = 2e-2 if name in ("torch_int4", "pyquant_bf16", "pyquant_int8_bf16") or fmt == "q4_0" else 1e-2
        assert float((y - want).norm() / want.norm()) < tol, name


def test_cpp_call_candidate_beside_ggml_computes_the_product():
    """With a ggml harness, ``pyquant_cpp`` calls the C++ entry point directly
    (kernel against kernel); a stand-in harness here, whose own product is not
    checked."""
    B = load_benchmark("bench_cpu")

    class StandIn:
        class lib:
            @staticmethod
            def mm_run(h):
                pass

        def handle(self, qw, m, threads, x):
            return None, None

    p = B.Problem("q4_0", 32, 576)
    fns, x, _ = B.candidates(p, 3, 1, p.copies(0), StandIn())
    assert "ggml" in fns
    y = fns["pyquant_cpp"]().double()
    want = x.double() @ p.dense.double().T
    assert float((y - want).norm() / want.norm()) < 2e-2
    assert torch.equal(fns["pyquant_cpp"](), fns["pyquant"]())
