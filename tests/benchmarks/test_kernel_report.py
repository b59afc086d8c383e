"""The offline kernel report (``pyquant.triton_kernels.tools.report``): its GPU model and
SASS parsing on fixed inputs, and the bounds today's kernels meet in their sm_90a
builds (no spills, wide loads, instructions per weight, occupancy), so that a later
change cannot make them worse without a test saying so. The tensor-core kernels
issue tightens these bounds."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyquant.ops.dispatch import registered
from pyquant.triton_kernels.tools import cuda_build, gpu_model, report
from pyquant.triton_kernels.tools import sass as S

ROOT = Path(__file__).resolve().parents[2]


def test_occupancy_limits():
    # 128 regs x 128 threads: 16 KB of registers per CTA -> 4 CTAs, register-bound
    occ = gpu_model.occupancy(128, 3584, 128)
    assert (occ.ctas_per_sm, occ.warps_per_sm, occ.limit) == (4, 16, "registers")
    # 48 KB of shared memory + 1 KB reserved: 4 CTAs of 228 KB
    assert gpu_model.occupancy(32, 48 * 1024, 128).ctas_per_sm == 4
    assert gpu_model.occupancy(32, 48 * 1024, 128).limit == "shared memory"
    # tiny kernels: 2048 threads per SM
    occ = gpu_model.occupancy(16, 0, 256)
    assert (occ.ctas_per_sm, occ.limit, occ.fraction) == (8, "threads", 1.0)
    # registers round up per warp to units of 256 (33 regs -> 40 per thread)
    assert gpu_model.occupancy(33, 0, 1024).ctas_per_sm == 1
    assert gpu_model.waves(264, occ) == pytest.approx(264 / (8 * 132))


def test_bandwidth_and_issue_time():
    assert gpu_model.bandwidth_us(3.35e6) == pytest.approx(1.0)
    # 32 threads x 528 schedulers x 1.755e9 clocks = one microsecond of issue
    assert gpu_model.issue_us(32 * 132 * 4 * 1.755e3) == pytest.approx(1.0)


SASS = """
        Function : _Z3fooPf
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E.U8 R8, desc[UR4][R2.64] ;
        /*0020*/                   FFMA R1, R2, R3, R4 ;
        /*0030*/              @!P0 BRA 0x0 ;
        /*0040*/                   EXIT ;
        Function : _Z3barv
        /*0000*/                   STG.E.64 desc[UR4][R2.64], R4 ;
        /*0010*/                   EXIT ;
"""
RES = """
 Function _Z3fooPf:
  REG:40 STACK:8 SHARED:1024 LOCAL:16 CONSTANT[0]:0
 Function _Z3barv:
  REG:8 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:0
"""


def test_sass_parsing_by_function():
    fns = S.split_functions(SASS)
    assert list(fns) == ["_Z3fooPf", "_Z3barv"] and len(fns["_Z3fooPf"]) == 5
    assert S.parse_sass(SASS) == fns["_Z3fooPf"]  # the first function only
    res = S.parse_res_usage(RES)
    assert res["_Z3fooPf"] == {"regs": 40, "stack": 8, "smem": 1024, "local": 16}
    st = S.stats_of("foo", fns["_Z3fooPf"], res["_Z3fooPf"], 2)
    assert st.loop == 4 and st.per_weight == 2.0 and st.local == 24
    assert S.mem_widths(st.loop_mem) == {"LDG.128": 1, "LDG.8": 1}
    assert S.stats_of("bar", fns["_Z3barv"], res["_Z3barv"], 1, whole_kernel=True).loop_mem == {"STG.E.64": 1}


# Bounds today's builds meet (measured with nvcc 13.0 and triton 3.9 for sm_90a),
# (kernel, variant text) -> (max instructions per weight in the main loop,
# min resident CTAs per SM, {load kind.bits: min count in the loop}).
BOUNDS = {
    ("cuda_int4_qmatmul_gemv", "M=1"): (14.0, 4, {"LDG.128": 8}),
    ("cuda_int4_qmatmul_gemv", "M=4"): (17.5, 3, {"LDG.128": 8}),
    ("cuda_int4mma_qmatmul", "MT=1"): (1.5, 2, {"LDGSTS.128": 8}),
    ("cuda_int4mma_qmatmul", "MT=2"): (2.0, 2, {"LDGSTS.128": 8}),
    ("cuda_int4mma_qmatmul", "MT=8"): (6.0, 2, {"LDGSTS.128": 8}),
    ("cuda_int8_w8a8_matmul", "GEMM"): (4.0, 4, {"LDGSTS.128": 4}),
    ("cuda_int_dequantize", "int4"): (3.0, 8, {"LDG.128": 1}),
    ("cuda_nf4_dequantize", "nf4"): (37.0, 8, {}),
    ("cuda_gguf_dequantize", "Q4_K"): (34.0, 8, {}),
    ("triton_any_qmatmul_gemv", "M=1"): (4.5, 6, {"LDG.128": 8}),
    ("triton_any_qmatmul_gemv", "M=4"): (10.0, 5, {"LDG.128": 8}),
    ("triton_any_qmatmul_splitk", "M=16"): (5.0, 3, {"LDGSTS.128": 4}),
    ("triton_any_qmatmul_splitk", "M=64"): (6.0, 3, {"LDGSTS.128": 4}),
    ("triton_any_qmatmul_gemm", "M=128"): (6.0, 3, {"LDGSTS.128": 4}),
    ("triton_any_qmatmul_gemm", "M=512"): (7.5, 2, {"LDGSTS.128": 4}),
    ("triton_any_dequantize", "int4"): (22.5, 10, {}),
}
WEIGHT_STREAMING = ("qmatmul",)  # main loops that must not read weights byte by byte


def test_int4mma_launch_shape_matches_the_launcher():
    """The report models the tensor-core kernel's grid with its own copy of the launch plan
    (triton_kernels may not import pyquant.ops); this keeps the copy honest."""
    from pyquant.ops.backends import cuda_mma

    for m in (1, 8, 9, 16, 17, 32, 33, 64):
        mt = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
        for group, fp in ((32, 2), (64, 4), (128, 8)):
            bn = report.int4mma_block_n(mt, fp)
            assert bn == cuda_mma.block_n(m, group), (m, group)
            for n, k in report.SHAPES + ((576, 576), (1536, 576), (576, 1536), (64, 128)):
                assert report.int4mma_splits(n, k, m, bn, 132) == cuda_mma.plan_splits(m, n, k, group, 132), (m, n, k)


def _report_tools_or_skip():
    try:
        cuda_build.nvcc()
        cuda_build.cuobjdump()
        cuda_build.sources()
    except cuda_build.ToolMissing as exc:
        pytest.skip(f"the offline report needs nvcc and cuobjdump: {exc}")
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:
        pytest.skip(f"triton with its NVIDIA backend is needed for the Triton half of the report: {exc}")


@pytest.mark.slow
def test_kernel_report_bounds(tmp_path):
    _report_tools_or_skip()
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-m", "pyquant.triton_kernels.tools.report", "--json", str(out)],
                       capture_output=True, text=True, timeout=1500, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "| cuda_int4_qmatmul_gemv |" in r.stdout and "bandwidth-bound us" in r.stdout
    data = json.loads(out.read_text())
    names = {n for ks in registered().values() for n in ks}
    rows = data["kernels"]
    assert {r["kernel"] for r in rows} <= names, "the report names kernels the registry does not have"
    assert not [r["variant"] for r in rows if r["spill_bytes"]], "spills"
    for (kernel, text), (max_ipw, min_ctas, loads) in BOUNDS.items():
        (row,) = [r for r in rows if r["kernel"] == kernel and text in r["variant"]]
        assert row["instr_per_weight"] <= max_ipw, row
        assert row["ctas_per_sm"] >= min_ctas, row
        for kind, count in loads.items():
            assert row["mem_widths"].get(kind, 0) >= count, (kind, row)
        if any(w in kernel for w in WEIGHT_STREAMING):
            assert "LDG.8" not in row["mem_widths"], row
    shapes = data["shapes"]
    assert {(s["n"], s["k"]) for s in shapes} == {(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)}
    assert all(s["bandwidth_us"] > 0 and s["waves"] > 0 for s in shapes)
