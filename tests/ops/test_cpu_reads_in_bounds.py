"""The CPU kernels read only inside the tensors they are given.

Each packed tensor of a weight is copied so that its last byte is the last one
before a page no one may read (PROT_NONE): a read past its end is then a
segmentation fault, not a silent read of whatever follows it. The products run
in a child process, so a fault fails this test instead of ending the run; the
child prints each case before it runs it, so the failure names the case.
Every format family, ragged and whole-group K, M from the GEMV to the tiled
sizes, both activation modes, every SIMD level this CPU has.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyquant import _ext

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _ext.load() is None, reason="needs Linux mmap/mprotect and pyquant._C"
)

CHILD = textwrap.dedent(
    r"""
    import ctypes, mmap
    import torch
    import pyquant
    from pyquant import _ext
    from pyquant.formats import GGUF, NF4, Int
    from pyquant.formats.base import QuantizedWeight
    from pyquant.ops.backends.cpu_activations import cpu_activations

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    PAGE = mmap.PAGESIZE
    KEEP = []

    def guarded(t):
        nbytes = t.numel() * t.element_size()
        pages = -(-nbytes // PAGE) + 1
        buf = mmap.mmap(-1, pages * PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert libc.mprotect(base + (pages - 1) * PAGE, PAGE, 0) == 0, ctypes.get_errno()
        g = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=(pages - 1) * PAGE - nbytes)
        g = g.view(t.dtype).view(t.shape)
        g.copy_(t)
        KEEP.append(buf)
        return g

    cases = [(GGUF(t), k) for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0") for k in (96, 384)]
    cases += [(GGUF(t), k) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K") for k in (256, 512)]
    cases += [(Int(b, g, sym), k) for b in (2, 3, 4, 8) for g, sym in ((64, False), (128, True), (256, False), (-1, False))
              for k in (224, 576)]
    cases += [(NF4(32), 96), (NF4(64), 576), (NF4(64, True), 1152)]
    torch.manual_seed(0)
    for fmt, k in cases:
        qw = pyquant.quantize_weight(torch.randn(5, k), fmt)
        fenced = QuantizedWeight(fmt, {name: guarded(t) for name, t in qw.tensors.items()}, qw.shape)
        for level in _ext.simd_levels():
            for mode in ("int8", "fp32"):
                for m in (1, 3, 8, 17):
                    print(f"{fmt.spec()} K={k} {level} {mode} M={m}", flush=True)
                    x = torch.randn(m, k)
                    with _ext.cpu_simd(level), cpu_activations(mode):
                        want = pyquant.qmatmul(x, qw, kernel="cpu")
                        got = pyquant.qmatmul(x, fenced, kernel="cpu")
                    assert torch.equal(got, want), (fmt.spec(), k, level, mode, m)
    print("done", flush=True)
    """
)


def test_kernels_read_nothing_past_their_tensors():
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", CHILD], cwd=root, capture_output=True, text=True, timeout=900)
    lines = run.stdout.strip().splitlines()
    last = lines[-1] if lines else "(nothing)"
    if run.returncode != 0 or last != "done":
        pytest.fail(f"child exited with {run.returncode} while running: {last}\n{run.stderr[-2000:]}")
