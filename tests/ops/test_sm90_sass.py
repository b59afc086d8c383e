"""Offline SASS facts of the Hopper kernels built on CUTLASS (csrc/cuda/*_sm90.cu),
compiled for sm_90a with nvcc and the CUTLASS headers, read with cuobjdump (no GPU):

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

csrc/cuda/int4mma_sm90.cu (int4 weight-only, IntMMA weights, M > 64):
* two instantiations (fp16 and bf16 x), none spilling;
* every wgmma takes the converted weights from registers (HGMMA's RS form,
  "R.., R.., gdesc"): the int4 codes never pass through shared memory as 16-bit
  values; they are decoded by lop3 and paired 16-bit arithmetic, with no
  int -> 16-bit conversion instruction;
* the weight, x, scales and zeros arrive by TMA; no cp.async or 128-bit plain
  global loads; the output leaves by TMA store.

    python -m pytest tests/ops/test_sm90_sass.py --runslow -s   # prints the kernels
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


@pytest.fixture(scope="module")
def int4_gemms():
    _skip_without_tools()
    ks = [k for k in cuda_sass.kernels("csrc/cuda/int4mma_sm90.cu", marker="HGMMA") if "GemmUniversal" in k.name]
    for k in ks:
        print(f"\nint4mma sm90 {_int4_dtype(k)}: {k.regs} regs, {k.spill} B local, {len(k.instrs)} instructions, "
              f"main loop {len(k.loop)}")
    return ks


def _int4_dtype(k):
    return "bf16" if any(".BF16" in t for t in k.instrs if t.startswith("HGMMA")) else "fp16"


def test_int4_two_instantiations_without_spills(int4_gemms):
    assert sorted(_int4_dtype(k) for k in int4_gemms) == ["bf16", "fp16"]
    assert not [(_int4_dtype(k), k.spill) for k in int4_gemms if k.spill]


def test_int4_wgmma_reads_the_weights_from_registers(int4_gemms):
    for k in int4_gemms:
        mmas = [t for t in k.instrs if t.startswith("HGMMA")]
        assert mmas, _int4_dtype(k)
        rs = [t for t in mmas if re.match(r"HGMMA\.\S+ R\d+, R\d+, gdesc", t)]
        assert len(rs) == len(mmas), (_int4_dtype(k), [t for t in mmas if t not in rs][:3])
        # the decode is lop3 + 16-bit sub/fma on pairs: no int -> 16-bit conversion instruction anywhere
        # (the I2F(P).F32.U32 there are the tile scheduler's index divisions)
        ops = k.ops(k.instrs)
        to16 = {o: c for o, c in ops.items() if o.startswith("I2F") and ("F16" in o or "BF16" in o)}
        assert not to16, (_int4_dtype(k), to16)
        pairs = "HFMA2.BF16_V2" if _int4_dtype(k) == "bf16" else "HFMA2"
        assert ops["LOP3.LUT"] > 0 and ops[pairs] > 0, (_int4_dtype(k), dict(ops))


def test_int4_operands_by_tma_output_by_tma_store(int4_gemms):
    for k in int4_gemms:
        ops = k.ops(k.instrs)
        assert ops["UTMALDG.3D"] + ops["UTMALDG.5D"] >= 3, (_int4_dtype(k), dict(ops))
        assert ops["UTMASTG.3D"] >= 1, _int4_dtype(k)
        streamed = {o: c for o, c in ops.items() if o.startswith("LDGSTS") or re.match(r"LDG\.E\.(64|128)", o)}
        assert not streamed, (_int4_dtype(k), streamed)
