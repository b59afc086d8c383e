"""Exporting a weight repacked for the tensor-core kernel (IntMMA) writes the same
bytes as the row-layout Int weight it came from: every exchange layout is defined
on rows, and the repack is lossless both ways."""
import pytest
import torch

import pyquant
from pyquant.formats import Int, to_mma
from pyquant.io import awq, compressed_tensors, gptq, hqq


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("export", [
    lambda qw: gptq.export_layer(qw, "gptq"),
    lambda qw: gptq.export_layer(qw, "gptq_v2"),
    lambda qw: awq.export_layer(qw),
    lambda qw: compressed_tensors.export_layer(qw, torch.float16),
    lambda qw: hqq.export_layer(qw),
], ids=["gptq", "gptq_v2", "awq", "compressed-tensors", "hqq"])
def test_mma_layout_exports_like_its_row_layout(export, sym):
    qw = pyquant.quantize_weight(torch.randn(64, 256, generator=torch.Generator().manual_seed(1)),
                                 Int(4, 128, sym, torch.float16))
    rows, mma = export(qw), export(to_mma(qw))
    assert rows.keys() == mma.keys()
    for key, t in rows.items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, mma[key]), key
