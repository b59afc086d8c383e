import os

import pytest
import torch

# triton.jit decides between compiling and interpreting when a kernel is
# *defined*, so the interpreter must be on before any test module (or pyquant
# code it calls) first imports pyquant.triton_kernels. Without a GPU, every
# Triton kernel in this suite runs in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests are written for 2 cores; keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_addoption(parser):
    parser.addoption(
        "--runslow", action="store_true", default=False,
        help="also run the tests marked slow (the real model, sm_90 compilation); CI does",
    )


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--runslow"):
        # Deselected rather than skipped: a quick local run says how many it left out.
        slow = [item for item in items if "slow" in item.keywords]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if "slow" not in item.keywords]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's accuracy measure)."""
    ref = ref.double()
    err = (ref - approx.double()).norm()
    if err == 0:
        return float("inf")
    return float(20 * torch.log10(ref.norm() / err))
