"""The GPU-session tooling, tested on the CPU: benchmarks/verified.py (junit XML
-> verified kernels -> verified_kernels.json), bench_cuda.py's report, and
gpu_check.sh's refusal to run without a GPU."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks import load_benchmark
from tests.deps import require

ROOT = Path(__file__).resolve().parents[2]


_load = load_benchmark


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="7">
<testcase classname="tests.gpu.test_cuda_gemv" name="test_cuda_int4_gemv_matches_reference[1-float16-sym-32-70x300]"/>
<testcase classname="tests.gpu.test_cuda_gemv" name="test_cuda_int4_gemv_cuda_graph_capture_and_replay"/>
<testcase classname="tests.gpu.test_cuda_w8a8" name="test_cuda_w8a8_gemm_matches_reference[1x40x70-torch.float16]">
  <failure message="boom">trace</failure></testcase>
<testcase classname="tests.gpu.test_cuda_w8a8" name="test_cuda_w8a8_gemm_torch_compile_fullgraph"/>
<testcase classname="tests.gpu.test_cuda_int" name="test_cuda_int_dequantize_bit_exact[a]"><skipped message="x"/></testcase>
<testcase classname="tests.gpu.test_cuda_nf4" name="test_cuda_int_dequantizer_is_not_a_prefix_match"/>
<testcase classname="tests.gpu.test_x" name="test_cuda_nf4_dequantize"><error message="setup">e</error></testcase>
</testsuite></testsuites>
"""
KERNELS = ["cuda_int4_gemv", "cuda_w8a8_gemm", "cuda_int_dequantize", "cuda_nf4_dequantize"]


def test_verified_from_junit_and_apply(tmp_path):
    v = _load("verified")
    (tmp_path / "junit.xml").write_text(JUNIT)
    out = tmp_path / "dev-verified.json"
    assert v.main(["from-junit", str(tmp_path / "junit.xml"), "--device", "dev", "--out", str(out),
                   "--kernels", ",".join(KERNELS), "--extra", '{"cuda_arch": "90a"}']) == 0
    res = json.loads(out.read_text())
    assert res["device"] == "dev" and res["cuda_arch"] == "90a"
    assert res["verified"] == ["cuda_int4_gemv"]
    assert res["failed"] == ["cuda_nf4_dequantize", "cuda_w8a8_gemm"]  # an error counts as a failure
    # only skipped: not verified; "test_cuda_int_dequantizer..." is no test of cuda_int_dequantize
    assert res["untested"] == ["cuda_int_dequantize"]
    assert res["kernels"]["cuda_int4_gemv"] == {"passed": 2, "failed": 0, "skipped": 0}

    assert set(res["sources"]) == set(KERNELS)  # every kernel's source hash at the time of the run

    target = tmp_path / "verified_kernels.json"
    target.write_text(json.dumps({"verified": ["cuda_w8a8_gemm", "triton_x"]}))  # the older layout
    assert v.main(["apply", str(out), "--file", str(target)]) == 0
    data = json.loads(target.read_text())["kernels"]
    assert sorted(data) == ["cuda_int4_gemv", "triton_x"]  # failed kernels are withdrawn
    assert data["cuda_int4_gemv"]["device"] == "dev" and data["cuda_int4_gemv"]["date"] == res["date"]
    assert data["cuda_int4_gemv"]["source_sha256"] == res["sources"]["cuda_int4_gemv"]
    assert data["triton_x"]["source_sha256"] is None  # carried over from the older layout: not verified


def test_verified_module_declared_kernels_and_no_gpu(tmp_path):
    v = _load("verified")
    mod = tmp_path / "tests" / "triton" / "test_tk.py"
    mod.parent.mkdir(parents=True)
    mod.write_text('GPU_KERNELS = ("triton_gemv", "triton_gemm")\n\ndef test_a():\n    pass\n')
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.triton.test_tk" name="test_a[x]"/>'
        '<testcase classname="tests.triton.test_tk.TestGroup" name="test_b"/>'
        '<testcase classname="tests.triton.test_tk" name="test_cuda_int4_gemv_here"><failure/></testcase>'
        '<testcase classname="tests.other" name="test_c"><failure/></testcase>'
        "</testsuite></testsuites>")
    kernels = ["triton_gemv", "triton_gemm", "triton_splitk", "cuda_int4_gemv"]
    res = v.summarize([str(tmp_path / "junit.xml"), str(tmp_path / "missing.xml")], kernels, root=tmp_path)
    assert res["kernels"]["triton_gemv"] == {"passed": 2, "failed": 0, "skipped": 0}
    assert res["verified"] == ["triton_gemm", "triton_gemv"]
    assert res["failed"] == ["cuda_int4_gemv"]  # the name rule wins over the module declaration
    assert res["untested"] == ["triton_splitk"]
    assert v.summarize([str(tmp_path / "junit.xml")], kernels, root=tmp_path, gpu=False)["verified"] == []
    out = tmp_path / "cpu-verified.json"
    v.main(["from-junit", str(tmp_path / "junit.xml"), "--no-gpu", "--out", str(out), "--kernels", "triton_gemv"])
    assert v.main(["apply", str(out), "--file", str(tmp_path / "vk.json")]) == 1  # refuses a CPU run


def test_verified_kernel_names_come_from_the_registry():
    v = _load("verified")
    names = v.gpu_kernel_names()
    assert {"cuda_int4_qmatmul_gemv", "cuda_int8_w8a8_matmul", "cuda_int_dequantize", "cuda_int_hqq_solve", "triton_int_gptq_block_update"} <= set(names)
    assert not any(n.startswith("reference") for n in names)


def test_gpu_test_names_follow_the_rule():
    # Every test function in tests/gpu/test_cuda_*.py names the kernel it tests
    # (or is a test of this tooling), so verified.py can attribute it.
    v = _load("verified")
    kernels = v.gpu_kernel_names()
    for path in sorted((ROOT / "tests" / "gpu").glob("test_cuda_*.py")):
        for line in path.read_text().splitlines():
            if line.startswith("def test_"):
                fn = line[4:].split("(", 1)[0]
                assert v.kernel_of(fn, kernels), f"{path.name}: {fn} names no registered kernel"


def test_bench_report_renders():
    b = _load("bench_cuda")
    st = {"us": 10.0, "p10_us": 9.5, "p90_us": 11.0, "dense_us": 30.0, "dense_p10_us": 29.0, "dense_p90_us": 31.5}
    result = {
        "device": "dev", "copy_gbps": 3000.0,
        "gemv": [{"kernel": "cuda_int4_qmatmul_gemv", "shape": "4096x4096", "m": m, **st,
                  "speedup_vs_dense": 3.0, "gbps": 2000.0, "copy_fraction": 0.66, "eager_us": 5.2} for m in (1, 2)],
        "w8a8": [{"kernel": "cuda_int8_w8a8_matmul", "shape": "4096x4096", "m": 16, **st,
                  "speedup_vs_dense": 1.5, "tops": 27.0}],
        "dequant": [{"kernel": "cuda_int_dequantize", "format": "int4_g128_asym_fp16", "shape": "4096x4096",
                     "us": 50.0, "p10_us": 49.0, "p90_us": 52.0, "gbps": 800.0, "copy_fraction": 0.27},
                    {"kernel": "cuda_nf4_dequantize", "format": "nf4_b64", "error": "no quantizer"}],
    }
    md = b.markdown(result)
    assert "| 4096x4096 | 1 | 10.0 | 9.5-11.0 | 30.0 | 29.0-31.5 | 3.00x | 2000 | 66% | 5.2 |" in md
    assert "| cuda_int_dequantize | int4_g128_asym_fp16 | 50.0 | 49.0-52.0 | 800 | 27% |" in md
    assert "no quantizer" in md
    require("matplotlib")
    png = Path(os.environ.get("TMPDIR", "/tmp")) / "pyquant_bench_test.png"
    assert b.plot(result, png) and png.stat().st_size > 0
    png.unlink()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_refuses_to_run_without_a_gpu(tmp_path):
    if shutil.which("nvidia-smi") is not None:
        pytest.skip("this machine has nvidia-smi")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK")}
    env["PYTHON"] = sys.executable
    env["GPU_CHECK_WORK"] = str(tmp_path / "work")  # never touch a real run's folder
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.returncode == 2
    assert "needs a GPU machine" in p.stdout + p.stderr
    assert not (tmp_path / "work").exists()  # refused before writing anything


def test_gpu_check_steps_are_named_in_junit_and_summary(tmp_path):
    r = _load("gpu_check_report")
    work, results = tmp_path / "work", tmp_path / "results"
    (work / "suite").mkdir(parents=True)
    log = work / "step-build.log"
    log.write_text("compiling\nerror: nvcc died\n")
    r.step_junit("build", 1, 12.0, log, work / "junit-build.xml")
    r.step_junit("benchmark", 0, 3.0, log, work / "junit-benchmark.xml")
    r.pytest_step_junit("gpu-test_cuda_gemv", 124, 120.0, log, work / "junit-gpu-test_cuda_gemv.xml")  # killed
    (work / "junit-gpu-test_cuda_int.xml").write_text(JUNIT)
    r.pytest_step_junit("gpu-test_cuda_int", 1, 5.0, log, work / "junit-gpu-test_cuda_int.xml")  # kept as is
    r.pytest_step_junit("gpu-elsewhere", 5, 1.0, log, work / "junit-gpu-elsewhere.xml")  # nothing collected: ok
    (work / "suite" / "dev.md").write_text("## suite table")
    res = r.summary(work, results, "dev", "90a")
    assert res["steps"]["build"] == {"passed": 0, "failed": 1, "skipped": 0,
                                     "failed_tests": ["gpu_check::build (build: exit status 1)"]}
    assert res["steps"]["gpu-test_cuda_gemv"]["failed_tests"] == [
        "gpu_check::gpu-test_cuda_gemv (gpu-test_cuda_gemv: timed out)"]
    assert res["steps"]["gpu-elsewhere"]["failed"] == 0 and res["steps"]["benchmark"]["passed"] == 1
    assert any("test_cuda_w8a8_gemm_matches_reference" in t for t in res["failed"])
    md = (results / "dev.md").read_text()
    assert "| build | 0 | 1 | 0 |" in md and "nvcc died" not in md and "## suite table" in md
    assert "- gpu_check::build (build: exit status 1)" in md
    assert "nvcc died" in (work / "junit-build.xml").read_text()  # the log's tail is in the report


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_without_a_gpu_writes_named_steps(tmp_path):
    if shutil.which("nvidia-smi") is not None:
        pytest.skip("this machine has nvidia-smi")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK")}
    env.update(PYTHON=sys.executable, GPU_CHECK_ALLOW_NO_GPU="1", GPU_CHECK_SKIP_BUILD="1",
               GPU_CHECK_WORK=str(tmp_path / "work"), GPU_CHECK_RESULTS=str(tmp_path / "results"),
               OUT=str(tmp_path / "out"))
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    res = json.loads((tmp_path / "results" / "no-gpu.json").read_text())
    assert res["steps"]["verified"]["passed"] == 1 and res["failed"] == []
    verified = json.loads((tmp_path / "results" / "no-gpu-verified.json").read_text())
    assert verified["gpu"] is False and verified["verified"] == []
    assert all(len(h) == 64 for h in verified["sources"].values() if h)
    assert {"gpu_check.log", "no-gpu.json", "no-gpu.md", "gpu_check_raw.tar.gz"} <= set(os.listdir(tmp_path / "out"))
