"""The CPU qmatmul benchmark: every format against its baselines, in one process.

For each format at K = N = 4096 (default) and each M, on 1 and 2 threads, from
a cold and from a warm cache, it times, interleaved (candidates alternate in
blocks, so load changes on a shared machine hit all alike):

* ``pyquant``: the registered CPU kernel through its launch plan (as
  ``pyquant.qmatmul`` calls it; no torch.library dispatch), in its
  default activation mode (GGUF: int8, llama.cpp's arithmetic; Int / NF4:
  exact fp32), and for Int / NF4 also ``pyquant_int8`` (the integer-dot kernels,
  two int8 planes of x) -- fp32 x; for Int4 also bf16 x, as torch's int4
  kernel takes: ``pyquant_bf16`` (the default for bf16 x: on a CPU with
  AVX512-BF16 the exact vdpbf16ps kernel, else the int8 planes) and
  ``pyquant_int8_bf16``;
* ``dense``: torch's fp32 ``x @ W.T`` on the dequantized weight;
* ``torch_int4``: ``aten._weight_int4pack_mm_for_cpu`` on the same codes,
  scales and zeros (Int4 only; bf16 x);
* ``ggml``: llama.cpp's CPU mul_mat on the same GGUF blocks, when ``--ggml``
  names a harness library (built outside this repository, see below), and
  beside it ``pyquant_cpp``: pyquant's C++ entry point called directly into a
  y allocated once, as the harness calls ggml (kernel against kernel: the
  ``pyquant`` column adds the Python call, ~2 us, a tenth of a 1536 x 576
  product);
* ``read``: a plain read of as many bytes as the packed weight (M = 1): the
  memory roofline, so GB/s can be given as a fraction of it.

Cold cache: every candidate rotates through enough copies of its weight that
each copy's previous use lies more than 2x the L3 size of other data back
(x and y stay hot, as activations do). Warm: one weight, back to back.
``--contention N`` runs N busy processes alongside (ratios to dense under
load).

The ggml harness is a shared library exporting (C ABI)::

    void* mm_new(int ggml_type, long n, long k, long m, int nthreads, const void* blocks, int repack);
    void  mm_set_x(void*, const float* x);   void mm_run(void*);
    void  mm_get_y(void*, float* y);         void mm_free(void*);

(weights in ggml's CPU repack buffer where llama.cpp would put them, one
ggml_mul_mat graph on the CPU backend). Its output is checked against
pyquant's (same quantized x blocks: they must agree to fp32 rounding).

Writes JSON and markdown (benchmarks/results/cpu-bench-<cpu>.json / .md) and
a PNG of speedup over dense fp32 against M; records the CPU model, the SIMD
level, thread count and load averages.

    python benchmarks/bench_cpu.py --quick                      # M 1, 8, 32; warm; 2 threads
    python benchmarks/bench_cpu.py --ggml /path/libggml_mm.so   # + llama.cpp's kernels
    python benchmarks/bench_cpu.py --formats int4_g128 q4_0 --m 1 8 32 128 512 --threads 1 2 --cache cold warm
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import glob
import json
import math
import multiprocessing
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cpu_name  # noqa: E402

import pyquant  # noqa: E402
from pyquant import _ext  # noqa: E402
from pyquant.formats import GGUF, NF4, Int, QuantizedWeight  # noqa: E402
from pyquant.ops.backends import cpu_gguf, cpu_int, cpu_nf4  # noqa: E402
from pyquant.ops.backends.cpu_activations import cpu_activations  # noqa: E402

FORMATS = {
    "int2_g128": Int(2, 128, False, torch.float16),
    "int3_g128": Int(3, 128, False, torch.float16),
    "int4_g128": Int(4, 128, False, torch.float16),
    "int8_g128": Int(8, 128, False, torch.float16),
    "nf4_b64": NF4(64),
    **{t.lower(): GGUF(t) for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")},
}
MS = (1, 8, 32, 128, 512)
QUICK_MS = (1, 8, 32)
KERNELS = {"int": cpu_int, "nf4": cpu_nf4, "gguf": cpu_gguf}


# ---- machine ----------------------------------------------------------------------------

def l3_bytes(default: int = 32 << 20) -> int:
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        m = re.match(r"(\d+)([KMG]?)", text)
        if m:
            best = max(best, int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])
    return best or default


def _spin():  # a busy process for --contention
    x = 0
    while True:
        x += 1


# ---- ggml ---------------------------------------------------------------------------------

class Ggml:
    """llama.cpp's mul_mat through a harness library (see the module doc)."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.mm_new.restype = ctypes.c_void_p
        self.lib.mm_new.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_int,
                                    ctypes.c_void_p, ctypes.c_int]
        for f in ("mm_set_x", "mm_get_y"):
            getattr(self.lib, f).argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        for f in ("mm_run", "mm_free"):
            getattr(self.lib, f).argtypes = [ctypes.c_void_p]
        self.path = path

    def handle(self, qw, m, threads, x):
        blocks = qw.tensors["blocks"].contiguous()
        n, k = qw.shape
        h = self.lib.mm_new(qw.format.block.ggml_type, n, k, m, threads, blocks.data_ptr(), 1)
        self.lib.mm_set_x(h, x.data_ptr())
        return h, blocks


# ---- one problem ----------------------------------------------------------------------

class Problem:
    def __init__(self, name: str, n: int, k: int, seed: int = 0):
        self.name, self.fmt, self.n, self.k = name, FORMATS[name], n, k
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, k, generator=g) * 0.02
        self.qw = pyquant.quantize_weight(w, self.fmt)
        self.dense = pyquant.dequantize(self.qw, kernel="reference").contiguous()
        self.family = self.fmt.family
        self.int4 = self._torch_int4() if isinstance(self.fmt, Int) and self.fmt.bits == 4 else None

    def _torch_int4(self):
        """Packed weight and scales_and_zeros for torch's int4 CPU kernel: torch
        computes (q - 8) * scale + zero, so (q - z) * s maps to zero = (8 - z) * s.
        None where torch has no such kernel or it cannot take the shape: its
        groups must divide K (SmolLM2's K = 576 at g128 leaves a ragged one)
        and its packing takes N in multiples of 16."""
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return None
        if (self.fmt.group_size > 0 and self.k % self.fmt.group_size != 0) or self.n % 16 != 0:
            return None
        codes = pyquant.unpack(self.qw, kernel="reference").to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        s, z = self.qw.tensors["scales"].float(), self.qw.tensors["zeros"].float()
        sz = torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return packed, sz

    def copies(self, evict_bytes: int):
        """Independent copies of every weight a candidate reads, per candidate
        enough that, taken in turn, a copy's previous use lies more than
        evict_bytes of other data back (one copy each when evict_bytes is 0)."""
        def n(nbytes):
            return 1 if evict_bytes == 0 else max(2, math.ceil(evict_bytes / max(nbytes, 1)) + 1)

        qcount = n(self.qw.nbytes)
        out = {
            "qw": [QuantizedWeight(self.fmt, {k: v.clone() for k, v in self.qw.tensors.items()}, self.qw.shape)
                   for _ in range(qcount)],
            "dense": [self.dense.clone() for _ in range(n(self.dense.numel() * 4))],
            "read": [torch.empty(self.qw.nbytes // 4 + 1, dtype=torch.int32).random_() for _ in range(qcount)],
        }
        if self.int4 is not None:
            out["int4"] = [tuple(t.clone() for t in self.int4) for _ in range(n(sum(t.numel() * t.element_size()
                                                                                   for t in self.int4)))]
        return out


def candidates(p: Problem, m: int, threads: int, copies, ggml=None):
    """name -> zero-argument callable (each call takes the next copy in turn)."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, p.k, generator=g)
    xb = x.to(torch.bfloat16)
    shape = (p.n, p.k)
    kern = KERNELS[p.family]
    state = {key: 0 for key in list(copies) + ["ggml"]}

    def nxt(key):
        state[key] = (state[key] + 1) % len(copies[key])
        return copies[key][state[key]]

    def mode(name, fn):
        def run():
            with cpu_activations(name):
                return fn()
        return run

    # Each copy through its launch plan, as pyquant.qmatmul and QuantLinear call
    # the kernel (the unplanned function's per-call checks cost 6 us alone and
    # ~20 us when the other candidates have just evicted the interpreter's data).
    plans = {id(qw): kern.qmatmul_plan(qw.tensor_list(), p.fmt, shape, torch.device("cpu"), m) for qw in copies["qw"]}

    def pyq(xx):
        return plans[id(nxt("qw"))](xx, None)

    c = {
        "pyquant": lambda: pyq(x),
        "dense": lambda: x @ nxt("dense").T,
    }
    if p.family != "gguf":
        c["pyquant_int8"] = mode("int8", lambda: pyq(x))
    if isinstance(p.fmt, Int) and p.fmt.bits == 4:
        c["pyquant_int8_bf16"] = mode("int8", lambda: pyq(xb))
        c["pyquant_bf16"] = lambda: pyq(xb)
    if p.int4 is not None:
        def torch_int4():
            packed, sz = nxt("int4")
            return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, p.fmt.group_size, sz)

        c["torch_int4"] = torch_int4
    if m == 1:
        c["read"] = lambda: nxt("read").amax()
    handles = []
    if ggml is not None and p.family == "gguf":
        handles = [ggml.handle(qw, m, threads, x) for qw in copies["qw"]]

        def run_ggml():
            state["ggml"] = (state["ggml"] + 1) % len(handles)
            ggml.lib.mm_run(handles[state["ggml"]][0])

        c["ggml"] = run_ggml
        entry, ggml_type = _ext.load().gguf_qmatmul, p.fmt.block.ggml_type
        y = torch.empty(m, p.n)
        blocks = {id(qw): qw.tensor_list()[0].data_ptr() for qw in copies["qw"]}

        def pyquant_cpp():
            entry(ggml_type, x.data_ptr(), blocks[id(nxt("qw"))], 0, y.data_ptr(), m, p.n, p.k, threads, True, 0)
            return y

        c["pyquant_cpp"] = pyquant_cpp
    return c, x, handles


def check_ggml(p: Problem, ggml: Ggml, m: int, threads: int) -> float:
    """Relative difference between ggml's and pyquant's products (same x blocks)."""
    x = torch.randn(m, p.k)
    h, keep = ggml.handle(p.qw, m, threads, x)
    ggml.lib.mm_run(h)
    y = torch.empty(m, p.n)
    ggml.lib.mm_get_y(h, y.data_ptr())
    ggml.lib.mm_free(h)
    ours = cpu_gguf.qmatmul(x, p.qw.tensor_list(), p.fmt, (p.n, p.k), None)
    return float((ours - y).norm() / y.norm())


def time_interleaved(fns: dict, repeats: int, block: int = 5, warmup: int = 2, clock=time.perf_counter):
    """(median ms, min ms) per candidate; blocks of calls in rotation, the first
    call of each block discarded (another library's threads were just asleep).
    clock: wall time, or the calling thread's CPU time (``--clock cpu``, one
    thread only: on an oversubscribed machine it leaves out the waits for a core)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {n: [] for n in fns}
    for _ in range(max(1, -(-repeats // block))):
        for name, fn in fns.items():
            fn()
            for _ in range(block):
                t0 = clock()
                fn()
                samples[name].append((clock() - t0) * 1e3)
    return ({n: statistics.median(v) for n, v in samples.items()}, {n: min(v) for n, v in samples.items()})


def run(args) -> dict:
    ggml = Ggml(args.ggml) if args.ggml else None
    l3 = l3_bytes()
    res = {
        "cpu": cpu_name(), "simd": _ext.load().simd_level(), "simd_levels": _ext.simd_levels(),
        "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "shape": {"n": args.n, "k": args.k}, "l3_bytes": l3, "ggml": ggml.path if ggml else None,
        "contention": args.contention, "load_average_start": os.getloadavg(), "rows": [],
    }
    busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.contention)]
    for b in busy:
        b.start()
    try:
        for name in args.formats:
            p = Problem(name, args.n, args.k)
            for cache in args.cache:
                copies = p.copies(2 * l3 if cache == "cold" else 0)
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    for m in args.m:
                        fns, x, handles = candidates(p, m, threads, copies, ggml)
                        reps = args.repeats if m <= 32 else max(5, args.repeats // 3)
                        clock = time.thread_time if args.clock == "cpu" and threads == 1 else time.perf_counter
                        med, mn = time_interleaved(fns, reps, clock=clock)
                        row = {"format": name, "spec": p.fmt.spec(), "cache": cache, "threads": threads, "m": m,
                               "clock": "cpu" if clock is time.thread_time else "wall",
                               "weight_bytes": p.qw.nbytes, "median_ms": med, "min_ms": mn,
                               "load_average": os.getloadavg()[0]}
                        if ggml is not None and p.family == "gguf":
                            row["ggml_rel_diff"] = check_ggml(p, ggml, m, threads)
                        for h, _ in handles:
                            ggml.lib.mm_free(h)
                        res["rows"].append(row)
                        print(f"{name} {cache} t={threads} M={m}: "
                              + " ".join(f"{k}={v:.3f}" for k, v in med.items()), file=sys.stderr, flush=True)
                del copies
    finally:
        for b in busy:
            b.terminate()
    res["load_average_end"] = os.getloadavg()
    return res


# ---- report --------------------------------------------------------------------------------

def fastest(t: dict) -> str:
    """The fastest of pyquant's candidates in one row of timings."""
    return min((n for n in ("pyquant", "pyquant_int8", "pyquant_bf16") if n in t), key=t.get)


def _ratio(t, a, b):
    return f"{t[b] / t[a]:.2f}" if a in t and b in t else "-"


def markdown(res: dict, key: str = "median_ms") -> str:
    out = [f"CPU: {res['cpu']} (SIMD {res['simd']}; levels {', '.join(res['simd_levels'])}), torch {res['torch']}, "
           f"N = {res['shape']['n']}, K = {res['shape']['k']}, {res['date']}; load average "
           f"{res['load_average_start'][0]:.1f} -> {res['load_average_end'][0]:.1f}"
           + (f"; {res['contention']} busy processes alongside" if res["contention"] else "")
           + f". {'Median' if key == 'median_ms' else 'Minimum'} ms of interleaved calls; ratios are speedups "
           "(baseline time / pyquant time) within one process.", ""]
    out += ["| format | cache | thr (clock) | M | pyquant | int8 path | bf16 x | int8 path, bf16 x | dense fp32 "
            "| torch int4 | ggml | x dense | x dense (fastest) | x torch int4 (bf16 x) | x ggml | C++ call "
            "| x ggml (C++ calls) | GB/s (fastest) | % read BW |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        t = r[key]
        fast = fastest(t)
        gbs = r["weight_bytes"] / t[fast] / 1e6
        read = f"{100 * t['read'] / t[fast]:.0f}%" if "read" in t else "-"
        f = lambda n: f"{t[n]:.3f}" if n in t else "-"  # noqa: E731
        out.append(f"| {r['format']} | {r['cache']} | {r['threads']} ({r.get('clock', 'wall')}) | {r['m']} "
                   f"| {f('pyquant')} | {f('pyquant_int8')} | {f('pyquant_bf16')} | {f('pyquant_int8_bf16')} "
                   f"| {f('dense')} | {f('torch_int4')} | {f('ggml')} | {_ratio(t, 'pyquant', 'dense')} "
                   f"| {_ratio(t, fast, 'dense')} | {_ratio(t, 'pyquant_bf16', 'torch_int4')} "
                   f"| {_ratio(t, 'pyquant', 'ggml')} | {f('pyquant_cpp')} | {_ratio(t, 'pyquant_cpp', 'ggml')} "
                   f"| {gbs:.1f} | {read} |")
    return "\n".join(out)


def plot(res: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: no plot", file=sys.stderr)
        return False
    keys = sorted({(r["cache"], r["threads"]) for r in res["rows"]})
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    for ax, (cache, threads) in zip(axes[0], keys):
        for name in dict.fromkeys(r["format"] for r in res["rows"]):
            rows = [r for r in res["rows"] if r["format"] == name and r["cache"] == cache and r["threads"] == threads]
            if not rows:
                continue
            ms = [r["m"] for r in rows]
            sp = [r["median_ms"]["dense"] / r["median_ms"][fastest(r["median_ms"])] for r in rows]
            ax.plot(ms, sp, marker="o", label=name)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("M (rows of x)")
        ax.set_ylabel("speedup over dense fp32 (fast path)")
        ax.set_title(f"{cache} cache, {threads} thread(s)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{res['cpu']} ({res['simd']}), N = K = {res['shape']['n']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--m", type=int, nargs="+", default=None, help=f"rows of x (default {MS})")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cache", nargs="+", choices=("cold", "warm"), default=["cold", "warm"])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=25, help="timed calls per candidate at M <= 32 (a third above)")
    ap.add_argument("--contention", type=int, default=0, help="busy processes to run alongside")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: one-thread runs timed by the thread's CPU time (for an oversubscribed machine)")
    ap.add_argument("--ggml", default=None, help="ggml harness library (see the module doc)")
    ap.add_argument("--quick", action="store_true", help=f"M in {QUICK_MS}, warm, 2 threads, fewer repeats")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu-bench-<cpu>.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.m, args.cache, args.threads, args.repeats = args.m or list(QUICK_MS), ["warm"], [2], 10
    args.m = args.m or list(MS)
    if _ext.load() is None:
        sys.exit("pyquant._C is not built; nothing to benchmark")
    if _ext.simd_emulated():
        sys.exit("pyquant._C is the emulated-SIMD test build (PYQUANT_SIMDE_INCLUDE): its timings mean nothing")
    res = run(args)
    table = markdown(res)
    print(table)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", res["cpu"]).strip("-").lower()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"cpu-bench-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n\n" + markdown(res, "min_ms") + "\n")
    if plot(res, out.with_suffix(".png")):
        print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
