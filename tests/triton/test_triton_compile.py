"""The Triton kernels compile for a real GPU target (sm_90), without a GPU.

The interpreter accepts things the compiler rejects (and vice versa), so this
runs Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the
bundled ptxas) for representative variants of every kernel, in a subprocess
where TRITON_INTERPRET is unset. It also checks that the bit-exact dequantize
kernels contain no fused multiply-add (``enable_fp_fusion=False``), which is
what keeps ``d * q + m`` rounded twice as in the references, and for the word-wise
Int4/Int8 kernels (``matmul/*_packed.py``) with their shipped configs, what their main loop's
machine code must look like: 16-byte weight loads, no byte loads, no spills, and an
instruction count per weight under a bound (``pyquant.triton_kernels.tools.sass``).
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.deps import require

triton = require("triton")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    r"""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import pyquant  # noqa: F401  (registers the source-tree finder)
    from pyquant.triton_kernels.matmul.dequant import dequant_kernel
    from pyquant.triton_kernels.matmul.epilogue import reduce_kernel
    from pyquant.triton_kernels.matmul.gemv import gemv_kernel
    from pyquant.triton_kernels.matmul.mm import mm_kernel

    assert type(dequant_kernel).__name__ == "JITFunction"
    TARGET = GPUTarget("cuda", 90, 32)
    TYPES = {"out": "*fp16", "perm": "*i32", "x": "*fp16", "ws": "*fp32", "bias": "*fp16",
             "p0": "*u8", "p1": "*fp16", "p2": "*fp16", "p3": "*u8", "p4": "*fp32", "p5": "*fp32",
             "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32", "i0": "i32", "i1": "i32"}

    def comp(fn, consts, types=None, **opts):
        t = dict(TYPES, **(types or {}))
        sig = {n: ("constexpr" if n in consts else t[n]) for n in fn.arg_names}
        return triton.compile(ASTSource(fn, sig, constexprs=consts), target=TARGET, options=opts)

    def deq(fmt, c0, c1, types=None, perm=False, out="*fp16", c2=0, uniform=False):
        consts = dict(FMT=fmt, C0=c0, C1=c1, C2=c2, UNIFORM=uniform, HAS_PERM=perm, BN=32, BK=128, SOFT_BF16=False)
        c = comp(dequant_kernel, consts, dict(types or {}, out=out), num_warps=4, enable_fp_fusion=False)
        return c.asm["ptx"].count("fma.rn")

    u8 = {"p1": "*u8", "p2": "*u8"}
    nf4_dq = {"p1": "*u8", "p2": "*fp32", "p3": "*fp32"}
    fmas = {
        "int3_asym_actorder": deq(1, 3, 1, perm=True, c2=7, uniform=True),
        "int4_sym_bf16scales_pc": deq(1, 4, 0, {"p1": "*bf16"}, out="*bf16"),
        "nf4_dq": deq(2, 64, 1, nf4_dq, out="*fp32"),
        "q4_1": deq(3, 3, 0, u8),
        "q5_0": deq(3, 6, 0, u8),
        "q2_k": deq(3, 10, 0, u8),
        "q3_k": deq(3, 11, 0, u8),
        "q4_k": deq(3, 12, 0, u8),
        "q5_k": deq(3, 13, 0, u8),
        "q6_k": deq(3, 14, 0, u8),
    }
    bad = {k: v for k, v in fmas.items() if v}
    assert not bad, f"fused multiply-adds in bit-exact dequantize kernels: {bad}"

    mm = dict(HAS_PERM=False, HAS_BIAS=True, SOFT_BF16=False, UNIFORM=False)
    comp(gemv_kernel, dict(mm, FMT=1, C0=4, C1=1, C2=7, BM=1, BN=64, BK=128, SPLIT=4, UNIFORM=True), num_warps=4)
    comp(gemv_kernel, dict(mm, FMT=2, C0=64, C1=1, C2=0, BM=2, BN=32, BK=64, SPLIT=4, UNIFORM=True), nf4_dq,
         num_warps=4)
    comp(gemv_kernel, dict(mm, FMT=3, C0=14, C1=0, C2=0, BM=4, BN=16, BK=128, SPLIT=1),
         dict(u8, x="*bf16", out="*bf16", bias="*bf16"), num_warps=4)
    for fmt, c0, c1, types, dt, bm in ((1, 4, 1, {}, "fp16", 16), (1, 8, 0, {}, "bf16", 64),
                                       (2, 64, 1, nf4_dq, "fp16", 32), (3, 12, 0, u8, "bf16", 128),
                                       (3, 8, 0, u8, "fp32", 64)):
        t = dict(types, x=f"*{dt}", out=f"*{dt}", bias=f"*{dt}")
        c = comp(mm_kernel, dict(mm, FMT=fmt, C0=c0, C1=c1, C2=6 if fmt == 1 else 0, BM=bm, BN=64, BK=64, SPLIT=1 if bm > 64 else 4,
                                   GROUP_M=8, X_F32=dt == "fp32", UPCAST_DOT=False), t, num_warps=4, num_stages=3)
        if dt != "fp32":  # fp32 uses IEEE fp32 dots (no tf32 tensor cores)
            assert "mma" in c.asm["ptx"], (fmt, dt)
    comp(mm_kernel, dict(mm, HAS_PERM=True, FMT=1, C0=4, C1=1, C2=5, BM=16, BN=64, BK=64, SPLIT=2, GROUP_M=8,
                           X_F32=False, UPCAST_DOT=False), num_warps=4, num_stages=3)
    comp(reduce_kernel, dict(SPLIT=4, HAS_BIAS=True, BLOCK=1024, SOFT_BF16=False),
         {"ws": "*fp32", "out": "*bf16", "bias": "*fp32"}, num_warps=4)
    n = len(fmas) + 10

    # word-wise Int4/Int8 kernels: every constexpr branch compiles
    from pyquant.triton_kernels.matmul.gemv_packed import gemv_packed_kernel
    from pyquant.triton_kernels.matmul.mm_packed import mm_int_kernel
    from pyquant.triton_kernels.tools import sass as S
    from pyquant.triton_kernels.tuning.configs import _GEMV_PACKED, _SPLITK_PACKED

    pk = dict(HAS_PERM=False, HAS_BIAS=True, SOFT_BF16=False)
    # (BM = 3 or 4, four activation rows, is the slowest build: only in the SASS check below)
    for bits, zero, gs, bm, x16, perm, dt in ((4, True, 7, 1, 1, False, "fp16"), (8, False, 0, 2, 2, False, "bf16"),
                                              (4, False, 5, 2, 0, True, "fp32"), (8, True, 6, 1, 1, True, "fp16")):
        t = {"x": f"*{dt}", "out": f"*{dt}", "bias": f"*{dt}", "sc": "*bf16", "zr": "*bf16"}
        S.compile_sm90(gemv_packed_kernel, dict(pk, BITS=bits, HAS_ZERO=zero, GSHIFT=gs, BM=bm, BN=16, BK=512,
                                               SPLIT=2, X16=x16, HAS_PERM=perm, NF4=False, DQ=False), t,
                       num_warps=2, num_stages=1)
        n += 1
    for dq, t in ((False, {"sc": "*fp32"}), (True, {"sc": "*u8", "zr": "*fp32"})):
        S.compile_sm90(gemv_packed_kernel, dict(pk, BITS=4, HAS_ZERO=False, GSHIFT=6, BM=2, BN=16, BK=512,
                                               SPLIT=1, X16=2, NF4=True, DQ=dq), dict(t, x="*bf16", out="*bf16",
                                                                                    bias="*bf16"),
                       num_warps=2, num_stages=1)
        n += 1
    for bits, zero, gs, dt, sw, perm in ((4, True, 7, "fp16", False, False), (4, False, 5, "bf16", True, True),
                                         (8, True, 0, "fp32", False, False), (8, False, 7, "bf16", True, False)):
        t = {"x": f"*{dt}", "out": f"*{dt}", "bias": f"*{dt}"}
        c = S.compile_sm90(mm_int_kernel, dict(pk, BITS=bits, HAS_ZERO=zero, GSHIFT=gs, BM=32, BN=64, BK=64,
                                                 SPLIT=2, GROUP_M=8, X_F32=dt == "fp32", UPCAST_DOT=False,
                                                 SCALE_W=sw, HAS_PERM=perm), t, num_warps=4, num_stages=3)
        if dt != "fp32":
            assert "mma" in c.asm["ptx"], (bits, dt)
        n += 1

    # machine code of the shipped configs (Int4 group 128, fp16): 16-byte weight
    # loads, no byte loads, no spills, and a bounded instruction count per weight
    new = dict(HAS_PERM=False, HAS_BIAS=False, SOFT_BF16=False)
    for m, limit in ((1, 4.5), (4, 11.0)):
        c = _GEMV_PACKED[m]
        k = S.compile_sm90(gemv_packed_kernel, dict(new, BITS=4, HAS_ZERO=True, GSHIFT=7, BM=m, BN=c.BN, BK=c.BK,
                                                   SPLIT=1, X16=1, NF4=False, DQ=False),
                           num_warps=c.num_warps, num_stages=c.num_stages)
        st = S.stats(f"gemv M={m}", k, 2 * c.BN * c.BK / (32 * c.num_warps))  # two K tiles per iteration
        assert st.loop_mem.get("LDG.E.128", 0) >= 2 * c.BN // c.num_warps, st
        assert not any(op.startswith(("LDG.E.U8", "LDL", "STL")) for op in st.loop_mem), st
        assert st.local == 0 and st.per_weight <= limit, st
        n += 1
    for m, limit in ((16, 6.5), (64, 7.0)):
        c = _SPLITK_PACKED[m]
        k = S.compile_sm90(mm_int_kernel, dict(new, BITS=4, HAS_ZERO=True, GSHIFT=7, BM=c.BM, BN=c.BN, BK=c.BK,
                                                 SPLIT=4, GROUP_M=8, X_F32=False, UPCAST_DOT=False,
                                                 SCALE_W=c.BM > 16), num_warps=c.num_warps, num_stages=c.num_stages)
        st = S.stats(f"split-K M={m}", k, c.BN * c.BK / (32 * c.num_warps))
        wide = st.loop_mem.get("LDGSTS.E.BYPASS.128", 0) + st.loop_mem.get("LDG.E.128", 0)
        assert wide >= 1 and "LDG.E.U8" not in st.loop_mem, st
        assert st.local == 0 and st.per_weight <= limit, st
        n += 1
    print("compiled", n)
    """
)


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton builds without the NVIDIA backend
        pytest.skip(f"triton has no NVIDIA backend here: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning
    # ~2 minutes on an idle machine; the limit leaves room for a shared, loaded one
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=1500, env=env,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip() == "compiled 34"
