"""The run-time SIMD dispatcher of the CPU kernels (csrc/cpu/simd.h).

Every level this CPU supports can be forced (environment or at run time); a
level the CPU lacks is a clear error, never an illegal instruction. A smaller
CPU is simulated with PYQUANT_SIMD_HIDE.
"""
import textwrap

import pytest
import torch

import pyquant
from pyquant import _ext
from pyquant.errors import KernelUnavailableError
from tests.isolated_python import run_python

C = _ext.load()
pytestmark = pytest.mark.skipif(C is None, reason="compiled extension pyquant._C not built")

ALL = ("scalar", "avx2", "avxvnni", "avx512")


def test_levels_reported():
    levels = _ext.simd_levels()
    assert levels[0] == "scalar" and set(levels) <= set(ALL)
    assert list(C.simd_all_levels()) == list(ALL)
    assert C.simd_level() in levels
    info = pyquant.env()
    assert info["cpu_simd"] == C.simd_level() and info["cpu_simd_levels"] == levels


@pytest.mark.parametrize("level", _ext.simd_levels() if C is not None else [])
def test_every_supported_level_can_be_forced(level):
    before = C.simd_level()  # the best level, or the one PYQUANT_SIMD forces on this run
    with _ext.cpu_simd(level):
        assert C.simd_level() == level
        qw = pyquant.quantize_weight(torch.randn(8, 64), pyquant.GGUF("Q8_0"))
        assert pyquant.qmatmul(torch.randn(2, 64), qw).shape == (2, 8)
    assert C.simd_level() == before


def test_default_is_the_best_level():
    r = _run({}, QMATMUL)
    assert r.returncode == 0, r.stderr
    assert f"RAN {_ext.simd_levels()[-1]}" in r.stdout, r.stdout


def test_unknown_level_is_an_error():
    with pytest.raises(ValueError, match="unknown SIMD level 'sse9'"):
        C.set_simd_level("sse9")
    with pytest.raises(KernelUnavailableError, match="sse9"):
        with _ext.cpu_simd("sse9"):
            pass


def _run(env: dict, body: str):
    """body in a fresh interpreter whose environment has `env`, and no other
    PYQUANT_SIMD* variable (a run of the suite may force a level), before pyquant loads."""
    setup = "import os\nos.environ.pop('PYQUANT_SIMD', None)\nos.environ.pop('PYQUANT_SIMD_HIDE', None)\n"
    setup += "".join(f"os.environ[{k!r}] = {v!r}\n" for k, v in env.items())
    return run_python(setup + textwrap.dedent(body))


QMATMUL = """
import torch, pyquant
from pyquant import _ext
from pyquant.errors import KernelUnavailableError
qw = pyquant.quantize_weight(torch.randn(8, 64), pyquant.GGUF("Q4_0"))
try:
    pyquant.qmatmul(torch.randn(1, 64), qw)
    print("RAN", _ext.load().simd_level())
except KernelUnavailableError as exc:
    print("ERROR", exc)
print("ENV", pyquant.env()["cpu_simd"])
"""


def test_a_level_the_cpu_lacks_is_a_clear_error_not_a_crash():
    # avx512 and avxvnni hidden: the dispatcher treats them as absent, as on an AVX2-only CPU
    hide = {"PYQUANT_SIMD_HIDE": "avx512,avxvnni"}
    r = _run({"PYQUANT_SIMD": "avx512", **hide}, QMATMUL)
    assert r.returncode == 0, r.stderr
    assert "ERROR PYQUANT_SIMD=avx512 asks for SIMD level 'avx512'" in r.stdout, r.stdout
    assert "this CPU supports only: scalar" in r.stdout and "ENV PYQUANT_SIMD=avx512" in r.stdout, r.stdout
    r = _run(hide, """
        from pyquant import _ext
        try:
            _ext.load().set_simd_level("avx512")
        except ValueError as exc:
            print("ERROR", exc)
        print("LEVEL", _ext.load().simd_level())
    """)
    assert r.returncode == 0, r.stderr
    assert "ERROR set_simd_level asks for SIMD level 'avx512'" in r.stdout and "LEVEL avx512" not in r.stdout


def test_hidden_levels_fall_back_to_the_best_remaining():
    r = _run({"PYQUANT_SIMD_HIDE": "avx512,avxvnni"}, QMATMUL)
    assert r.returncode == 0, r.stderr
    want = "avx2" if "avx2" in _ext.simd_levels() else "scalar"
    assert f"RAN {want}" in r.stdout, r.stdout


def test_environment_forces_a_lower_level():
    r = _run({"PYQUANT_SIMD": "scalar"}, QMATMUL)
    assert r.returncode == 0, r.stderr
    assert "RAN scalar" in r.stdout and "ENV scalar" in r.stdout, r.stdout


@pytest.mark.skipif(not (C is not None and C.simd_avx512_bf16()), reason="this CPU has no AVX512-BF16")
def test_avx512_bf16_can_be_hidden():
    """PYQUANT_SIMD_HIDE=avx512bf16 takes the extension alone away (an avx512
    CPU without it): the level stays avx512, the Int4 bf16 kernel is not
    taken, and a bf16 qmatmul still runs (on the fp32 or int8 kernels)."""
    body = """
        import torch, pyquant
        from pyquant import _ext
        from pyquant.formats import Int
        C = _ext.load()
        qw = pyquant.quantize_weight(torch.randn(16, 256), Int(4, 128, True))
        x = torch.randn(4, 256).bfloat16()
        y = pyquant.qmatmul(x, qw)
        ref = pyquant.qmatmul(x, qw, kernel="reference")
        print("LEVEL", C.simd_level(), "BF16", C.simd_avx512_bf16(), "ROUTE", C.int_bf16_kernel(2, 4, 4),
              "ENV", pyquant.env()["cpu_avx512_bf16"], "CLOSE", bool(torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2)))
    """
    r = _run({"PYQUANT_SIMD_HIDE": "avx512bf16"}, body)
    assert r.returncode == 0, r.stderr
    assert "LEVEL avx512 BF16 False ROUTE False ENV False CLOSE True" in r.stdout, r.stdout
    r = _run({}, body)
    assert r.returncode == 0, r.stderr
    assert "LEVEL avx512 BF16 True ROUTE True ENV True CLOSE True" in r.stdout, r.stdout
    # a lower level forced: the extension is not used either
    r = _run({"PYQUANT_SIMD": "avx2"}, body)
    assert "LEVEL avx2 BF16 False ROUTE False" in r.stdout, r.stdout
