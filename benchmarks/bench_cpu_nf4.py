"""CPU NF4 qmatmul: pyquant's C++ kernel vs torch fp32 and bitsandbytes.

One layer, K = N = 4096 by default (NF4 block 64 with double quantization,
QLoRA's setting), M in 1, 8, 32, two threads. Candidates, all timed in the
same process and interleaved (each repetition runs every candidate once,
because the machine is shared and its load changes by the second):

* ``pyquant``: ``pyquant.qmatmul(x, qw, kernel="cpu")``, the public API.
* ``torch fp32``: ``x @ W.T`` on the dense fp32 weight (the baseline).
* ``bnb matmul_4bit``: ``bitsandbytes.matmul_4bit(x, W4.t(), state)``, its
  generic path (dequantize, then matmul).
* ``bnb Linear4bit``: an eval-mode ``bitsandbytes.nn.Linear4bit``, which on
  CPUs with AVX512-BF16 repacks the weight and runs bitsandbytes' fused CPU
  kernel (``gemv_4bit``; bf16 activations). Skipped where it does not run.

The table reports the best repetition (on a shared machine the other samples
measure the neighbours); the JSON also keeps the median. A second table runs
the same candidates on one thread timed by process CPU time, which other
jobs' load does not inflate (wall-clock timings of two OpenMP threads wait for
the slower, often descheduled, one). Each candidate's
worst error against the exact product (``x.double() @ W.double().T`` with the
NF4 weight, or the dense one for torch) is recorded, because bitsandbytes'
fused path computes in bf16. GB/s counts the bytes the NF4
kernel must read (packed weight, absmax, x) and write (y); the copy bandwidth
is measured in the same run.

    PYTHONPATH=. python benchmarks/bench_cpu_nf4.py [--quick] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import pyquant  # noqa: E402
from pyquant import NF4, _ext  # noqa: E402

from _timing import copy_bandwidth, cpu_name, interleaved, load_average  # noqa: E402


def bnb_candidates(w, x, block_size, double_quant):
    """name -> callable(x) for the bitsandbytes paths that run here."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except Exception as exc:  # noqa: BLE001 - report, do not fail the run
        return {}, f"bitsandbytes unavailable: {exc}"
    out, notes = {}, []
    packed, state = F.quantize_4bit(w, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)
    out["bnb matmul_4bit"] = lambda a: bnb.matmul_4bit(a, packed.t(), state)
    try:
        n, k = w.shape
        lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                                compress_statistics=double_quant)
        lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=block_size,
                                       compress_statistics=double_quant)
        lin = lin.to("cpu").eval()
        with torch.no_grad():
            lin(x[:1])  # converts the weight to bitsandbytes' CPU layout
        fused = getattr(lin.weight.quant_state, "packing_format_for_cpu", False)

        def run(a):
            with torch.no_grad():
                return lin(a)

        out["bnb Linear4bit" + (" (fused CPU kernel, bf16)" if fused else "")] = run
    except Exception as exc:  # noqa: BLE001
        notes.append(f"bnb Linear4bit eval path failed: {type(exc).__name__}: {exc}")
    return out, "; ".join(notes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=4096, help="out_features")
    p.add_argument("--k", type=int, default=4096, help="in_features")
    p.add_argument("--ms", default="1,8,32", help="comma-separated M values")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--no-double-quant", action="store_true")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    p.add_argument("--no-cpu-time", action="store_true", help="skip the 1-thread CPU-time table")
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu-nf4.json"))
    args = p.parse_args(argv)

    if _ext.load() is None:
        sys.exit("pyquant._C is not built; build it first (see COMMON.md)")
    torch.set_num_threads(args.threads)
    repeat = args.repeat or (5 if args.quick else 25)
    n, k = args.n, args.k
    dq = not args.no_double_quant
    ms = [int(v) for v in args.ms.split(",")]

    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    qw = pyquant.quantize_weight(w, NF4(args.block_size, dq))
    w_nf4 = pyquant.dequantize(qw)
    x_max = torch.randn(max(ms), k, generator=g)
    bnb_fns, bnb_note = ({}, "skipped (--no-bnb)") if args.no_bnb else bnb_candidates(w, x_max, args.block_size, dq)
    copy_gbs = copy_bandwidth(64 << 20, max(5, repeat // 2), warmup=2)

    def measure(threads, clock, reps):
        torch.set_num_threads(threads)
        rows = []
        for m in ms:
            x = x_max[:m].contiguous()
            cands = {
                "pyquant": lambda a=x: pyquant.qmatmul(a, qw, kernel="cpu"),
                "torch fp32": lambda a=x: a @ w.T,
            }
            cands.update({name: (lambda a=x, f=f: f(a)) for name, f in bnb_fns.items()})
            # Each candidate against the exact product of the weight it computes
            # with: the NF4 weight, or the dense one for torch fp32.
            ref_nf4 = x.double() @ w_nf4.double().T
            ref_dense = x.double() @ w.double().T
            errs = {}
            for name, fn in cands.items():
                ref = ref_dense if name == "torch fp32" else ref_nf4
                errs[name] = float((fn().double() - ref).abs().max() / ref.abs().max())
            timings = dict(zip(cands, interleaved(list(cands.values()), reps, warmup=2, clock=clock)))
            nbytes = qw.nbytes + x.numel() * 4 + m * n * 4
            base = timings["torch fp32"][0]
            for name, (best, med) in timings.items():
                rows.append({
                    "m": m, "candidate": name, "best_ms": best * 1e3, "median_ms": med * 1e3,
                    "speedup_vs_torch_fp32": base / best, "max_rel_err": errs[name],
                    "gb_per_s": nbytes / best / 1e9 if name == "pyquant" else None,
                })
        return rows

    def table(rows, with_bw):
        head = "| M | candidate | best ms | median ms | vs torch fp32 | max rel err |"
        print(head + (" GB/s (% of copy) |" if with_bw else ""))
        print("|---|---|---|---|---|---|" + ("---|" if with_bw else ""))
        for r in rows:
            line = (f"| {r['m']} | {r['candidate']} | {r['best_ms']:.3f} | {r['median_ms']:.3f} | "
                    f"{r['speedup_vs_torch_fp32']:.2f}x | {r['max_rel_err']:.1e} |")
            if with_bw:
                line += f" {r['gb_per_s']:.1f} ({100 * r['gb_per_s'] / copy_gbs:.0f}%) |" if r["gb_per_s"] else " |"
            print(line)

    rows = measure(args.threads, time.perf_counter, repeat)
    # The same candidates on one thread, timed by the process's CPU time:
    # descheduling by other jobs on a shared machine does not count, so these
    # ratios are stable where wall-clock ones are not.
    cpu_rows = [] if args.no_cpu_time else measure(1, time.process_time, repeat)

    print(f"\nNF4 qmatmul, N={n} K={k}, block {args.block_size}{' double-quant' if dq else ''}, "
          f"{args.threads} threads, best of {repeat} (interleaved); copy bandwidth {copy_gbs:.1f} GB/s\n")
    table(rows, True)
    if cpu_rows:
        print(f"\nSame, 1 thread, process CPU time (immune to other jobs' load), best of {repeat}\n")
        table(cpu_rows, False)
    if bnb_note:
        print(f"\nnote: {bnb_note}")

    result = {
        "benchmark": "cpu-nf4-qmatmul",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "loadavg": load_average(), "simd": _ext.load().simd_level()},
        "versions": {"torch": torch.__version__, "pyquant": pyquant.__version__,
                     "bitsandbytes": _bnb_version()},
        "config": {"n": n, "k": k, "block_size": args.block_size, "double_quant": dq, "threads": args.threads,
                   "repeat": repeat, "quick": args.quick},
        "copy_gb_per_s": copy_gbs,
        "notes": bnb_note,
        "rows": rows,
        "rows_1thread_cpu_time": cpu_rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")


def _bnb_version():
    try:
        import bitsandbytes

        return bitsandbytes.__version__
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
