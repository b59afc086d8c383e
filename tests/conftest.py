import os

import pytest
import torch

# Tests are written for 2 cores; keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
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
