"""Offline SASS facts of the Hopper W8A8 path, compiled for sm_90a with nvcc and
the CUTLASS headers, read with cuobjdump (no GPU):

csrc/cuda/w8a8_sm90.cu (the CUTLASS GEMM):
* four instantiations, fp16 and bf16 output x the two tile shapes (64 x 64 for
  M <= 128, 128 x 128 above), none spilling to local memory;
* the tensor-core op is IGMMA .S8.U8: the weight's unsigned codes go in as
  stored, no conversion pass;
* operands arrive by TMA, multicast across the cluster, and no cp.async or
  128-bit plain global load streams them; the output leaves by TMA store;
* no CALL anywhere (no device-side printf / abort path was instantiated).

csrc/cuda/quantize_rows_w8a8.cu (the activation quantizer):
* the aligned path reads x with 128-bit loads and writes codes 8 (fp16/bf16 x)
  or 4 (fp32 x) bytes per store; no instantiation spills.

    python -m pytest tests/ops/test_w8a8_sm90_sass.py --runslow -s   # prints the kernels
"""
import re

import pytest

from pyquant.triton_kernels.tools import cuda_build
from tests.ops import cuda_sass

pytestmark = pytest.mark.slow


def _skip_without_tools():
    why = cuda_sass.missing_tools()
    if why:
        pytest.skip(why)
    if cuda_build.cutlass_include() is None:
        pytest.skip("CUTLASS headers not installed (pip install nvidia-cutlass)")


@pytest.fixture(scope="module")
def gemms():
    _skip_without_tools()
    ks = [k for k in cuda_sass.kernels("csrc/cuda/w8a8_sm90.cu") if "GemmUniversal" in k.name]
    for k in ks:
        print(f"\n{_config(k)}: {k.regs} regs, {k.spill} B local, {len(k.instrs)} instructions")
    return ks


def _config(k: cuda_sass.KernelSass):
    shapes = sorted({t.split()[0] for t in k.instrs if t.startswith("IGMMA")})
    out = "bf16" if "bfloat16_t" in k.name else "fp16"
    return out, tuple(shapes)


def test_four_instantiations_without_spills(gemms):
    configs = sorted(_config(k) for k in gemms)
    assert configs == sorted((o, (f"IGMMA.64x{n}x32.S8.U8",)) for o in ("fp16", "bf16") for n in (64, 128)), configs
    spilling = [(_config(k), k.spill) for k in gemms if k.spill]
    assert not spilling, f"local memory (spills) in {spilling}"


def test_operands_by_tma_multicast_and_output_by_tma_store(gemms):
    for k in gemms:
        ops = k.ops(k.instrs)
        assert ops["UTMALDG.3D.MULTICAST"] >= 1, (_config(k), "no multicast TMA load")
        assert ops["UTMASTG.3D"] >= 1, (_config(k), "no TMA store")
        streamed = {o: c for o, c in ops.items() if o.startswith("LDGSTS") or re.match(r"LDG\.E\.(64|128)", o)}
        assert not streamed, (_config(k), streamed)
        assert not k.has("CALL") and not any(t.startswith("CALL") for t in k.instrs), _config(k)


@pytest.fixture(scope="module")
def quantizers():
    _skip_without_tools()
    return [k for k in cuda_sass.kernels("csrc/cuda/quantize_rows_w8a8.cu") if "quantize_rows_w8a8_kernel" in k.short]


def test_quantizer_aligned_path_is_vectorized(quantizers):
    assert len(quantizers) == 6  # fp16, bf16, fp32 x (aligned, any)
    for k in quantizers:
        assert not k.spill, (k.short, k.spill)
        m = re.search(r"quantize_rows_w8a8_kernel<(\w+), (true|false)>", k.short)
        assert m, k.short
        if m.group(2) == "false":
            continue
        ops = k.ops(k.instrs)
        loads = {o for o in ops if o.startswith("LDG")}
        assert loads == {"LDG.E.128.CONSTANT"}, (k.short, loads)
        code_store = "STG.E" if m.group(1) == "float" else "STG.E.64"
        assert ops[code_store] >= 1 and not ops["STG.E.U8"], (k.short, dict(ops))
