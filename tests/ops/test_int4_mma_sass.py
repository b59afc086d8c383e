"""Offline SASS bounds of the tensor-core int4 kernel (csrc/cuda/int4_mma.cu),
compiled for sm_90a with nvcc and read with cuobjdump (no GPU):

* no kernel instantiation spills to local memory;
* no CALL or BSSY (divergent reconvergence) in any main loop;
* the weight stream uses only 128-bit accesses (LDGSTS.128 into shared memory,
  LDS.128 out of it) and the loop has no plain global load at all;
* at most 2 instructions per weight in the main loop for M <= 16 with group
  128 / per-channel and M <= 8 with group 64, fp16 and bf16 activations (the
  decode and small-batch shapes the bandwidth targets are about).

    python -m pytest tests/ops/test_int4_mma_sass.py --runslow -s   # prints the table
"""
import re

import pytest

from tests.ops import cuda_sass
from tests.ops import int4_mma_emulation as emu

SOURCE = "csrc/cuda/int4_mma.cu"
pytestmark = pytest.mark.slow


def _params(k: cuda_sass.KernelSass):
    """(activation dtype, MT, FP) of an int4_mma_kernel<T, TS, MT, FP> instantiation."""
    m = re.search(r"int4_mma_kernel<(\w+), (\w+), (\d+), (\d+)>", k.short)
    assert m, k.short
    return ("fp16" if m.group(1) == "__half" else "bf16"), int(m.group(3)), int(m.group(4))


def weights_per_iteration(k: cuda_sass.KernelSass) -> int:
    """Codes one thread decodes per main-loop iteration: TW n16 tiles x one 128-deep stage / 32 lanes."""
    _, mt, fp = _params(k)
    return emu.tiles_per_warp(mt, fp) * 16 * emu.const("kStageK") // 32


@pytest.fixture(scope="module")
def kernels():
    why = cuda_sass.missing_tools()
    if why:
        pytest.skip(why)
    ks = [k for k in cuda_sass.kernels(SOURCE, marker="HMMA") if "int4_mma_kernel" in k.short]
    print("\n" + cuda_sass.table(ks, weights_per_iteration))
    return ks


def test_every_instantiation_compiles_without_spills(kernels):
    assert len(kernels) == 2 * 2 * 4 * 3 - 2 * 2  # act x scale dtype x MT x FP, less MT=8 with group 32
    spilling = [(k.short, k.spill) for k in kernels if k.spill]
    assert not spilling, f"local memory (spills) in {spilling}"


def test_main_loops_have_no_call_or_divergent_branch(kernels):
    for k in kernels:
        assert k.loop, f"{k.short}: no main loop found"
        assert not k.has("CALL") and not k.has("BSSY"), f"{k.short}: CALL/BSSY in the main loop"


def test_weight_stream_is_128_bit(kernels):
    for k in kernels:
        ops = k.ops()
        copies = {op: n for op, n in ops.items() if op.startswith("LDGSTS")}
        assert copies and all(op.endswith(".128") for op in copies), f"{k.short}: {copies}"
        assert not any(op.startswith("LDG") and not op.startswith("LDGSTS") and op != "LDGDEPBAR"
                       for op in ops), f"{k.short}: plain global loads in the loop"
        assert ops.get("LDS.128", 0) == 2 * emu.tiles_per_warp(*_params(k)[1:]), f"{k.short}: weight reads"


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_at_most_two_instructions_per_weight_where_bandwidth_bound(kernels, dtype):
    checked = 0
    for k in kernels:
        act, mt, fp = _params(k)
        if act != dtype or not ((fp == 8 and mt <= 2) or (fp == 4 and mt == 1)):
            continue
        per = len(k.loop) / weights_per_iteration(k)
        assert per <= 2.0, f"{k.short}: {per:.2f} instructions per weight"
        checked += 1
    assert checked == 6  # 2 scale dtypes x (MT 1, 2 at FP 8 and MT 1 at FP 4)


def test_dequantizer_reads_lane_slots_with_128_bit_loads():
    why = cuda_sass.missing_tools()
    if why:
        pytest.skip(why)
    ks = cuda_sass.kernels("csrc/cuda/int4_mma_dequant.cu", marker="LDG.E.EF.128")
    assert len(ks) == 9  # output dtype x scale dtype
    for k in ks:
        assert k.spill == 0, f"{k.short}: spills"
        loads = {op: n for op, n in k.loop_mem().items() if op.startswith("LDG") and "U16" not in op}
        assert loads.get("LDG.E.EF.128") == 1, f"{k.short}: the lane slot is not one 128-bit streaming load {loads}"
