"""CPU benchmark of pyquant's Int qmatmul kernels against torch, in one process.

For int4 g128 and int8 g128 (asymmetric, fp16 scales) at K = N = 4096 and
M in 1, 2, 4, 8, 16, 32, 64, 128 it times, interleaved and on the same
thread count (default 2):

* ``pyquant.qmatmul(x, qw, kernel="cpu")`` with fp32 x (and, for int4, with
  bf16 x: the fair comparison with torch's int4 kernel, which takes bf16),
  and the registered CPU kernel called directly (without torch.library's
  custom-op dispatch, which costs ~25 us per call);
* torch's dense fp32 ``x @ W.T`` with W the dequantized weight;
* torch's own int4 CPU kernel ``aten._weight_int4pack_mm_for_cpu`` (bf16 x)
  on the same codes, group size, scales and zero points (checked to compute
  the same product as ours before it is timed).

* a plain read of as many bytes as the packed weight (``int32`` ``amax``,
  which streams at the machine's read bandwidth): the memory roofline.

Cache state (``--cache``, default ``both``):

* ``cold``: the weights come from DRAM, as in a real model, whose weights
  never fit in the last-level cache: every candidate rotates through enough
  independent copies of its weight (packed tensors, dense matrix, torch's
  packed int4 and its scales) that each copy's previous use lies at least
  2x the L3 size of other data back (L3 size read from sysfs, fallback
  32 MiB). x and the output stay hot, as activations do.
* ``warm``: one weight called back to back; an 8 MiB int4 weight then stays
  in L3 (the figure the kernels were first tuned on).

Each figure is the median of repeats run in rotating blocks (the machine may
be shared), with the minimum reported alongside. Prints one markdown table
per cache state (ms, speedups, GB/s of the packed weight for our kernel,
torch's int4 kernel and the plain read) and writes JSON to
benchmarks/results/cpu-int.json.

    python benchmarks/bench_cpu_int.py                    # cold and warm, full
    python benchmarks/bench_cpu_int.py --quick            # M in 1, 8, 64; fewer repeats
    python benchmarks/bench_cpu_int.py --cache warm       # the old warm-only run

``Problem`` and ``cases()`` are importable for pytest-benchmark.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import math
import re
import subprocess
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

import pyquant  # noqa: E402
from pyquant.formats import Int, QuantizedWeight  # noqa: E402
from pyquant.ops.backends import cpu_int  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cpu_name  # noqa: E402

FORMATS = {
    "int4_g128": Int(4, 128, False, torch.float16),
    "int8_g128": Int(8, 128, False, torch.float16),
}
MS = (1, 2, 4, 8, 16, 32, 64, 128)
QUICK_MS = (1, 8, 64)


def l3_bytes(default: int = 32 << 20) -> int:
    """Size of the largest CPU cache (sysfs, else lscpu), or `default`."""
    def parse(text: str) -> int:
        m = re.match(r"\s*([\d.]+)\s*([KMG]?)i?B?", text.strip())
        if not m:
            return 0
        return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])

    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                best = max(best, parse(f.read()))
        except OSError:
            pass
    if not best:
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            for line in out.splitlines():
                if line.startswith("L3 cache:"):
                    best = parse(line.split(":", 1)[1])
        except (OSError, subprocess.SubprocessError):
            pass
    return best or default


class Rotation:
    """Independent copies of one candidate's weight, handed out in turn.

    `make()` builds one copy; there are enough copies that, cycling through
    them, a copy's previous use lies more than `evict_bytes` of other data
    back. Candidates that share a Rotation advance the same cursor, so the
    distance only grows."""

    def __init__(self, make, copy_bytes: int, evict_bytes: int):
        n = max(2, math.ceil(evict_bytes / max(copy_bytes, 1)) + 1)
        self.copies = [make() for _ in range(n)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.copies)
        return self.copies[self.i]


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# --- problem setup ----------------------------------------------------------------
class Problem:
    """One quantized weight and everything the baselines need."""

    def __init__(self, name: str, n: int = 4096, k: int = 4096, seed: int = 0):
        self.name, self.fmt, self.n, self.k = name, FORMATS[name], n, k
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, k, generator=g) * 0.02
        self.qw = pyquant.quantize_weight(w, self.fmt)
        self.w_dense = pyquant.dequantize(self.qw, kernel="reference").contiguous()
        self.int4 = self._torch_int4() if self.fmt.bits == 4 else None

    def _torch_int4(self):
        """Weight and scales_and_zeros for aten._weight_int4pack_mm_for_cpu.

        torch dequantizes w = (q - 8) * scale + zero per group, so our
        (q - z) * s maps to scale = s, zero = (8 - z) * s.
        """
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return None
        codes = pyquant.unpack(self.qw, kernel="reference").to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        s = self.qw.tensors["scales"].float()
        z = self.qw.tensors["zeros"].float()
        sz = torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return packed, sz

    def torch_int4(self, xb, int4=None):
        packed, sz = int4 or self.int4
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, self.fmt.group_size, sz)

    def read_buffer(self) -> torch.Tensor:
        """int32 buffer of the packed weight's size (rounded up to 4 bytes)."""
        return torch.randint(-(2**31), 2**31 - 1, ((self.qw.nbytes + 3) // 4,), dtype=torch.int32)

    def rotations(self, evict_bytes: int) -> dict:
        """Cold-cache copies of every candidate's weight (built once, lazily)."""
        if getattr(self, "_rot", None) is None:
            def qcopy():
                return QuantizedWeight(self.fmt, {k: v.clone() for k, v in self.qw.tensors.items()}, self.qw.shape)

            self._rot = {
                "qw": Rotation(qcopy, self.qw.nbytes, evict_bytes),
                "dense": Rotation(self.w_dense.clone, _nbytes(self.w_dense), evict_bytes),
                "read": Rotation(self.read_buffer, self.qw.nbytes, evict_bytes),
            }
            if self.int4 is not None:
                self._rot["int4"] = Rotation(lambda: tuple(t.clone() for t in self.int4), _nbytes(*self.int4),
                                             evict_bytes)
        return self._rot

    def check_int4_matches(self) -> float:
        """Relative difference between torch's int4 result and ours on bf16 x
        (differences come from torch's bf16 scales/zeros and output only)."""
        x = torch.randn(4, self.k).to(torch.bfloat16)
        ours = pyquant.qmatmul(x.float(), self.qw, kernel="cpu")
        theirs = self.torch_int4(x).float()
        rel = float((ours - theirs).norm() / ours.norm())
        if rel > 2e-2:
            raise RuntimeError(f"torch int4 baseline disagrees with pyquant ({rel:.3g}); layout mismatch?")
        return rel


def cases(p: Problem, m: int, seed: int = 1, cold: bool = False, evict_bytes: int = 0):
    """name -> zero-argument callable, for one problem and M.

    cold: each call takes the next copy of its weight (see Rotation), with
    at least `evict_bytes` (default 2x L3) of other weights read since that
    copy's last use; else every call uses the same weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, p.k, generator=g)
    xb = x.to(torch.bfloat16)
    shape = (p.n, p.k)
    if cold:
        rot = p.rotations(evict_bytes or 2 * l3_bytes())
        qw, dense, read = rot["qw"].next, rot["dense"].next, rot["read"].next
        int4 = rot["int4"].next if "int4" in rot else None
    else:
        buf = p.read_buffer()
        qw, dense, read, int4 = (lambda: p.qw), (lambda: p.w_dense), (lambda: buf), (lambda: p.int4)
    out = {
        "pyquant": lambda: pyquant.qmatmul(x, qw(), kernel="cpu"),
        # the registered kernel without torch.library's dispatch (~25 us per call)
        "pyquant_kernel": lambda: cpu_int.qmatmul(x, qw().tensor_list(), p.fmt, shape, None),
        "dense_fp32": lambda: x @ dense().T,
        # a plain read of the packed weight's bytes: the memory roofline
        "read": lambda: read().amax(),
    }
    if p.int4 is not None:
        out["pyquant_bf16"] = lambda: pyquant.qmatmul(xb, qw(), kernel="cpu")
        out["pyquant_kernel_bf16"] = lambda: cpu_int.qmatmul(xb, qw().tensor_list(), p.fmt, shape, None)
        out["torch_int4_bf16"] = lambda: p.torch_int4(xb, int4())
    return out


def time_interleaved(fns: dict, repeats: int, warmup: int = 2, block: int = 5):
    """(median ms, min ms) per callable over `repeats` calls each.

    Calls run in blocks of `block` per callable, blocks in rotation: load
    changes on a shared machine hit every candidate alike, while a candidate
    is not timed right after a different library's thread pool went to sleep
    (every first call of a block is discarded). The minimum is the figure
    least disturbed by other processes."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    rounds = max(1, -(-repeats // block))
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}, {name: min(v) for name, v in samples.items()}


def repeats_for(m: int, quick: bool, repeats: int = 0) -> int:
    base = repeats or (7 if quick else 31)
    return base if m <= 16 else max(5, base // 2)


# --- report -------------------------------------------------------------------------
def run(args) -> dict:
    torch.set_num_threads(args.threads)
    ms = QUICK_MS if args.quick else tuple(args.m or MS)
    caches = ("cold", "warm") if args.cache == "both" else (args.cache,)
    l3 = l3_bytes()
    results = {
        "device": cpu_name(),
        "threads": torch.get_num_threads(),
        "simd": pyquant._ext.load().simd_level(),
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "shape": {"n": args.n, "k": args.k},
        "l3_bytes": l3,
        "evict_bytes": 2 * l3,
        # other processes on a shared machine distort 2-thread timings badly
        "load_average_start": os.getloadavg()[0],
        "rows": [],
    }
    for name in args.formats:
        p = Problem(name, args.n, args.k)
        wbytes = p.qw.nbytes
        check = p.check_int4_matches() if p.int4 is not None else None
        for cache in caches:
            for m in ms:
                fns = cases(p, m, cold=cache == "cold", evict_bytes=2 * l3)
                t, tmin = time_interleaved(fns, repeats_for(m, args.quick, args.repeats))
                row = {"format": name, "cache": cache, "m": m, "weight_bytes": wbytes, "ms": t, "min_ms": tmin}
                row["speedup_vs_dense"] = t["dense_fp32"] / t["pyquant"]
                row["speedup_vs_dense_kernel"] = t["dense_fp32"] / t["pyquant_kernel"]
                if "torch_int4_bf16" in t:
                    row["speedup_vs_torch_int4"] = t["torch_int4_bf16"] / t["pyquant_bf16"]
                    row["speedup_vs_torch_int4_kernel"] = t["torch_int4_bf16"] / t["pyquant_kernel_bf16"]
                    row["torch_int4_rel_diff"] = check
                    row["torch_int4_gbps"] = wbytes / (t["torch_int4_bf16"] * 1e-3) / 1e9
                row["pyquant_gbps"] = wbytes / (t["pyquant"] * 1e-3) / 1e9
                row["pyquant_kernel_gbps"] = wbytes / (t["pyquant_kernel"] * 1e-3) / 1e9
                row["read_gbps"] = wbytes / (t["read"] * 1e-3) / 1e9
                row["dense_gbps"] = p.n * p.k * 4 / (t["dense_fp32"] * 1e-3) / 1e9
                results["rows"].append(row)
                print(f"  {name} {cache} M={m}: "
                      + ", ".join(f"{k} {v:.3f} (min {tmin[k]:.3f}) ms" for k, v in t.items()), file=sys.stderr)
        p._rot = None  # free the copies before the next format
    results["load_average_end"] = os.getloadavg()[0]
    return results


def markdown(results: dict, key: str = "ms", cache: str = "cold") -> str:
    """Table of one statistic (key "ms": medians, "min_ms": minima) for one
    cache state. GB/s are of the packed weight's bytes: our kernel (fp32 x),
    torch's int4 kernel, and a plain read of as many bytes (the roofline)."""
    rows = [r for r in results["rows"] if r.get("cache", "warm") == cache]
    if not rows:
        return ""
    how = ("weights from DRAM: copies rotated, > 2x L3 read between uses" if cache == "cold"
           else "one weight, called back to back")
    lines = [
        f"{cache.upper()} cache ({how}). CPU: {results['device']}, {results['threads']} threads, "
        f"SIMD {results['simd']}, torch {results['torch']}; N = {results['shape']['n']}, "
        f"K = {results['shape']['k']}; {'median' if key == 'ms' else 'minimum'} ms; "
        f"load average {results['load_average_start']:.1f} -> {results['load_average_end']:.1f}",
        "",
        "| format | M | pyquant fp32 x | (kernel only) | dense fp32 | x dense (kernel) | pyquant bf16 x "
        "| (kernel only) | torch int4 bf16 | x torch int4 (kernel) | GB/s kernel | GB/s torch int4 | GB/s read |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r[key]
        wb = r["weight_bytes"]
        has_i4 = "torch_int4_bf16" in t
        b16 = f"{t['pyquant_bf16']:.3f}" if has_i4 else "-"
        k16 = f"{t['pyquant_kernel_bf16']:.3f}" if has_i4 else "-"
        ti4 = f"{t['torch_int4_bf16']:.3f}" if has_i4 else "-"
        vi4 = "-"
        gi4 = "-"
        if has_i4:
            vi4 = (f"{t['torch_int4_bf16'] / t['pyquant_bf16']:.2f} "
                   f"({t['torch_int4_bf16'] / t['pyquant_kernel_bf16']:.2f})")
            gi4 = f"{wb / t['torch_int4_bf16'] / 1e6:.1f}"
        lines.append(
            f"| {r['format']} | {r['m']} | {t['pyquant']:.3f} | {t['pyquant_kernel']:.3f} | {t['dense_fp32']:.3f} "
            f"| {t['dense_fp32'] / t['pyquant']:.2f} ({t['dense_fp32'] / t['pyquant_kernel']:.2f}) | {b16} | {k16} "
            f"| {ti4} | {vi4} | {wb / t['pyquant_kernel'] / 1e6:.1f} | {gi4} | {wb / t['read'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"M in {QUICK_MS}, fewer repeats")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--m", type=int, nargs="+", help=f"rows of x (default {MS})")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--cache", choices=("cold", "warm", "both"), default="both",
                    help="weights evicted from the caches before each call (cold), reused (warm), or both tables")
    ap.add_argument("--repeats", type=int, default=0, help="timed calls per candidate at M <= 16 (half above)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-int.json"))
    args = ap.parse_args(argv)
    if pyquant._ext.load() is None:
        sys.exit("pyquant._C is not built; nothing to benchmark")
    results = run(args)
    for cache in ("cold", "warm"):
        for key in ("ms", "min_ms"):
            table = markdown(results, key, cache)
            if table:
                print(table)
                print()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
