"""Every test here needs pyquant._C with its CUDA kernels: on a machine with a CUDA
device a build without them fails each test (named in the JUnit report) instead of
skipping it (tests/gpu/_cuda_util.cuda_ext_or_skip)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _cuda_extension():
    if torch.cuda.is_available():
        from tests.gpu._cuda_util import cuda_ext_or_skip

        cuda_ext_or_skip()
