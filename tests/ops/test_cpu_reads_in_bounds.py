"""The CPU kernels read only inside the tensors they are given.

Each packed tensor of a weight is copied so that its last byte is the last one
before a page no one may read (PROT_NONE), or, in the second run, so that it
starts right after such a page: a read past either end is then a segmentation
fault, not a silent read of whatever lies there. The products run
in a child process, so a fault fails this test instead of ending the run; the
child prints each case before it runs it, so the failure names the case.
x and the bias are fenced the same way. Every format family, ragged and
whole-group K, M from the GEMV to the tiled sizes, fp32 / bf16 / fp16 x, both
activation modes, the quantizers (RTN, k-quant, HQQ), packing and unpacking,
the dequantization, the backward's transposed product and the
low-rank (QLoRA) product too, every SIMD level this CPU has.
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
    import ctypes, mmap, sys
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

    FENCE_AT_START = sys.argv[1] == "start"

    def guarded(t):
        nbytes = t.numel() * t.element_size()
        pages = -(-nbytes // PAGE) + 1
        buf = mmap.mmap(-1, pages * PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        fence = 0 if FENCE_AT_START else (pages - 1) * PAGE
        assert libc.mprotect(base + fence, PAGE, 0) == 0, ctypes.get_errno()
        start = PAGE if FENCE_AT_START else (pages - 1) * PAGE - nbytes
        g = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start)
        g = g.view(t.dtype).view(t.shape)
        g.copy_(t)
        KEEP.append(buf)
        return g

    def transposed(qw, g):
        return (torch.ops.pyquant.qmatmul_transposed(g, qw.tensor_list(), qw.format.spec(), *qw.shape, "cpu"),)

    def lowrank(qw, x, a, b):
        return torch.ops.pyquant.lora_qmatmul(x, qw.tensor_list(), qw.format.spec(), *qw.shape, None, a, b, 0.5, None,
                                              "cpu")

    cases = [(GGUF(t), k) for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0") for k in (96, 224, 384)]
    cases += [(GGUF(t), k) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K") for k in (256, 512, 768)]
    cases += [(Int(b, g, sym), k) for b in (2, 3, 4, 8) for g, sym in ((64, False), (128, True), (256, False), (-1, False))
              for k in (224, 576)]
    cases += [(NF4(32), 96), (NF4(64), 576), (NF4(64, True), 1152)]
    torch.manual_seed(0)
    def same_weight(a, b):
        return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)

    for fmt, k in cases:
        # N = 21 for Q4_0: one block of 16 weight rows (its transposed kernel at the avx512 level, M >= 4)
        n = 21 if fmt.spec() == GGUF("Q4_0").spec() else 5
        w = torch.randn(n, k)
        methods = ("rtn", "hqq") if isinstance(fmt, Int) and not fmt.symmetric else ("rtn",)
        for method in methods:
            print(f"{fmt.spec()} K={k} quantize {method}", flush=True)
            assert same_weight(pyquant.quantize_weight(guarded(w), fmt, method), pyquant.quantize_weight(w, fmt, method))
        qw = pyquant.quantize_weight(w, fmt)
        fenced = QuantizedWeight(fmt, {name: guarded(t) for name, t in qw.tensors.items()}, qw.shape)
        for level in _ext.simd_levels():
            print(f"{fmt.spec()} K={k} {level} dequantize", flush=True)
            with _ext.cpu_simd(level):
                assert torch.equal(pyquant.dequantize(fenced, kernel="cpu"), pyquant.dequantize(qw, kernel="cpu"))
                if isinstance(fmt, Int):
                    codes = pyquant.unpack(qw, kernel="cpu")
                    assert torch.equal(pyquant.unpack(fenced, kernel="cpu"), codes)
                    assert torch.equal(pyquant.pack(guarded(codes), fmt), qw.tensors["qweight"])
            for mode in ("int8", "fp32"):
                for m, dtype in ((1, torch.float32), (3, torch.bfloat16), (8, torch.float16), (17, torch.float32)):
                    print(f"{fmt.spec()} K={k} {level} {mode} M={m} {dtype}", flush=True)
                    x = torch.randn(m, k).to(dtype)
                    bias = torch.randn(n)
                    with _ext.cpu_simd(level), cpu_activations(mode):
                        want = pyquant.qmatmul(x, qw, bias, kernel="cpu")
                        got = pyquant.qmatmul(guarded(x), fenced, guarded(bias), kernel="cpu")
                    assert torch.equal(got, want), (fmt.spec(), k, level, mode, m)
                    print(f"{fmt.spec()} K={k} {level} {mode} M={m} transposed and low-rank", flush=True)
                    g, a, b = torch.randn(m, n), torch.randn(4, k), torch.randn(n, 4)
                    with _ext.cpu_simd(level), cpu_activations(mode):
                        for fn, args in ((transposed, (g,)), (lowrank, (x.float(), a, b))):
                            want = fn(qw, *args)
                            got = fn(fenced, *(guarded(t) for t in args))
                            assert all(torch.equal(u, v) for u, v in zip(got, want)), (fn.__name__, fmt.spec(), k)
    # act_order: the C++ entry point gathers x's columns by perm (fenced too)
    fmt = Int(4, 128, False, torch.float16, True)
    qw = fmt.pack(torch.randint(0, 16, (5, 576), dtype=torch.int32), torch.randn(5, 5) * 0.02, torch.rand(5, 5) * 16,
                  torch.randperm(576).to(torch.int32))
    fenced = QuantizedWeight(fmt, {name: guarded(t) for name, t in qw.tensors.items()}, qw.shape)
    for level in _ext.simd_levels():
        for mode in ("int8", "fp32"):
            for m, dtype in ((1, torch.float32), (3, torch.bfloat16), (17, torch.float16)):
                print(f"{fmt.spec()} K=576 {level} {mode} M={m} {dtype}", flush=True)
                x = torch.randn(m, 576).to(dtype)
                with _ext.cpu_simd(level), cpu_activations(mode):
                    assert torch.equal(pyquant.qmatmul(guarded(x), fenced, kernel="cpu"),
                                       pyquant.qmatmul(x, qw, kernel="cpu")), (fmt.spec(), level, mode, m)
    print("done", flush=True)
    """
)


@pytest.mark.parametrize("fence", ("end", "start"))
def test_kernels_read_nothing_outside_their_tensors(fence):
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", CHILD, fence], cwd=root, capture_output=True, text=True, timeout=900)
    lines = run.stdout.strip().splitlines()
    last = lines[-1] if lines else "(nothing)"
    if run.returncode != 0 or last != "done":
        pytest.fail(f"child exited with {run.returncode} while running: {last}\n{run.stderr[-2000:]}")
