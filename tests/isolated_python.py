"""Run a snippet of Python in a fresh interpreter, optionally as if ``pyquant._C`` were never built.

A fresh process is the only honest way to test import-time behaviour and the
missing-extension fallback: in the test process pyquant (and its extension)
are already imported and cached.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Prepended to the snippet: `import pyquant._C` fails as it does on an install
# whose build of the extension failed or was skipped.
_BLOCK_EXTENSION = """\
import importlib.abc as _abc, sys as _sys
class _NoCompiledExtension(_abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "pyquant._C":
            raise ImportError("pyquant._C blocked by the test: the install without the compiled extension")
_sys.meta_path.insert(0, _NoCompiledExtension())
"""


def run_python(code: str, without_extension: bool = False, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) with this interpreter from the repository root; capture its output."""
    source = textwrap.dedent(code)
    if without_extension:
        source = _BLOCK_EXTENSION + source
    return subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )
