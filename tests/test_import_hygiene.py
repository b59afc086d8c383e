"""Importing pyquant has no side effects and survives a missing extension."""
import subprocess
import sys

from tests.isolated_python import run_python as _run


def test_import_is_light():
    r = _run(
        """
        import sys, pyquant
        heavy = [m for m in ("triton", "transformers", "gguf", "bitsandbytes", "pyquant._C") if m in sys.modules]
        print(heavy)
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_works_without_extension_and_warns_once():
    r = _run(
        """
        import warnings
        import torch, pyquant
        from pyquant.formats import Int
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            qw = pyquant.quantize_weight(torch.randn(8, 64), Int(4, 32))
            x = torch.randn(2, 64)
            y1 = pyquant.qmatmul(x, qw)
            y2 = pyquant.qmatmul(x, qw)
        msgs = [str(m.message) for m in w if "extension unavailable" in str(m.message)]
        assert len(msgs) == 1, msgs
        assert torch.allclose(y1, x @ qw.dequantize().T, atol=1e-5)
        print(pyquant.env()["cpu_cxx"])
        """,
        without_extension=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_env_cli():
    r = subprocess.run([sys.executable, "-m", "pyquant", "env", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import json

    info = json.loads(r.stdout)
    for key in ("cpu_cxx", "cpu_simd", "cuda_cxx", "cuda_arches", "triton", "device", "kernels"):
        assert key in info


def test_test_folders_cannot_shadow_installed_packages():
    """A test folder without ``__init__.py`` goes on sys.path under its own
    name: ``tests/triton`` once became ``import triton`` for the whole run
    (breaking transformers, bitsandbytes and hqq with it). Every folder of
    tests is a package of ``tests``, so none is ever a top-level name."""
    from pathlib import Path

    root = Path(__file__).resolve().parent
    for folder in [root, *root.rglob("*")]:
        if folder.is_dir() and any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), f"{folder} holds Python files but no __init__.py"
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is not None:
        origin = Path(spec.origin or next(iter(spec.submodule_search_locations))).resolve()
        assert root not in origin.parents, f"'import triton' resolves inside the tests: {origin}"
