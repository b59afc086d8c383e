"""CPU GGUF kernels: dequantize vs gguf-py, fused qmatmul vs torch fp32 matmul.

Every ratio compares timings taken in the same process, interleaved (candidate
and baseline alternate in each repetition) because the benchmark machine is
shared; the tables give the best of the repetitions, the JSON also medians.
Timings include allocating the output, as a caller would see them. Prints a markdown table and writes JSON (default
benchmarks/results/cpu-gguf.json).

    PYTHONPATH=. python benchmarks/bench_cpu_gguf.py [--quick] [--threads 2]
    # on a busy shared machine, one thread timed by its own CPU time:
    PYTHONPATH=. python benchmarks/bench_cpu_gguf.py --threads 1 --clock cpu \
        --out benchmarks/results/cpu-gguf-1thread-cputime.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import gguf  # noqa: E402

import pyquant  # noqa: E402
from pyquant import _ext  # noqa: E402
from pyquant.formats import QuantizedWeight  # noqa: E402
from pyquant.formats.gguf import BLOCK_TYPES, GGUF  # noqa: E402

from _timing import copy_bandwidth, cpu_name, interleaved, load_average  # noqa: E402

# Byte offsets of each type's fp16 fields (d, and dmin/m where present).
F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
FUSED_TYPES = ("Q4_K", "Q6_K", "Q8_0")


def random_blocks(type_name: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random codes with weight-like fp16 scales (|N(0, 1e-3)|), shape (n, row bytes)."""
    bt = BLOCK_TYPES[type_name]
    nb = n * (k // bt.block_size)
    blocks = rng.integers(0, 256, size=(nb, bt.type_size), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        scale = np.abs(rng.normal(0, 1e-3, size=nb)).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(nb, 2)
    return blocks.reshape(n, -1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=4096, help="out_features")
    p.add_argument("--k", type=int, default=4096, help="in_features")
    p.add_argument("--m", type=int, nargs="+", default=[1, 16], help="activation rows for qmatmul")
    p.add_argument("--types", nargs="+", default=list(BLOCK_TYPES), choices=list(BLOCK_TYPES))
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: the calling thread's CPU time (user + system, so page faults count), which "
                        "leaves out time spent waiting for a core on a shared machine; needs --threads 1")
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu-gguf.json"))
    args = p.parse_args(argv)
    clock = time.perf_counter
    if args.clock == "cpu":
        if args.threads != 1:
            p.error("--clock cpu measures one thread; use it with --threads 1")
        clock = time.thread_time

    if _ext.load() is None:
        print("pyquant._C is not built; nothing to benchmark", file=sys.stderr)
        return 1
    if _ext.simd_emulated():
        sys.exit("pyquant._C is the emulated-SIMD test build (PYQUANT_SIMDE_INCLUDE): its timings mean nothing")
    torch.set_num_threads(args.threads)
    rep_ours = 5 if args.quick else 15
    rep_ref = 1 if args.quick else 3
    rng = np.random.default_rng(0)
    n, k = args.n, args.k
    copy_gbs = copy_bandwidth(n * k * 4, rep_ours, clock=clock)

    results = {
        "device": "cpu",
        "cpu": cpu_name(),
        "threads": args.threads,
        "clock": args.clock,
        "simd": _ext.load().simd_level(),
        "torch": torch.__version__,
        "gguf": getattr(gguf, "__version__", "?"),
        "shape": [n, k],
        "copy_GBps": copy_gbs,
        "loadavg_start": load_average()[0],
        "dequantize": [],
        "qmatmul": [],
    }
    print(f"# CPU GGUF kernels, {n}x{k}, {args.threads} threads, simd={results['simd']}, {args.clock} clock, "
          f"torch copy {copy_gbs:.1f} GB/s (read+write), best of {rep_ours}\n")
    print("## dequantize -> fp32 vs gguf.quants.dequantize (numpy)\n")
    print("`pyquant` is the public op allocating its output (like gguf-py); `kernel` is the same public op\n"
          "with `out=` a reused buffer, so the difference is the OS faulting in and zeroing fresh pages.\n")
    print("| type | gguf-py ms | pyquant ms | speedup | kernel ms | kernel speedup | kernel GB/s (in+out) | of copy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    qws = {}
    for t in args.types:
        bt = BLOCK_TYPES[t]
        blocks_np = random_blocks(t, n, k, rng)
        blocks = torch.from_numpy(blocks_np)
        qw = QuantizedWeight(GGUF(t), {"blocks": blocks}, (n, k))
        qws[t] = qw
        qtype = gguf.GGMLQuantizationType(bt.ggml_type)
        ours = lambda: pyquant.dequantize(qw, torch.float32, kernel="cpu")  # noqa: E731
        out = torch.empty(n, k)
        kern = lambda: pyquant.dequantize(qw, torch.float32, kernel="cpu", out=out)  # noqa: E731
        ref = lambda: gguf.quants.dequantize(blocks_np, qtype)  # noqa: E731
        assert np.array_equal(ours().numpy().view(np.int32), ref().view(np.int32)), t
        # gguf-py takes ~100x longer: a few of its runs between ours.
        (o1, k1) = interleaved([ours, kern], rep_ours, clock=clock)
        ((t_ref, med_ref),) = interleaved([ref], rep_ref, warmup=0, clock=clock)
        (o2, k2) = interleaved([ours, kern], rep_ours, clock=clock)
        t_ours, med_ours = min(o1[0], o2[0]), min(o1[1], o2[1])
        t_kern, med_kern = min(k1[0], k2[0]), min(k1[1], k2[1])
        gbs = (blocks.numel() + n * k * 4) / t_kern / 1e9
        row = {"type": t, "gguf_py_ms": t_ref * 1e3, "pyquant_ms": t_ours * 1e3, "speedup": t_ref / t_ours,
               "kernel_ms": t_kern * 1e3, "kernel_speedup": t_ref / t_kern, "kernel_GBps": gbs,
               "of_copy": gbs / copy_gbs,
               "median_ms": {"gguf_py": med_ref * 1e3, "pyquant": med_ours * 1e3, "kernel": med_kern * 1e3}}
        results["dequantize"].append(row)
        print(f"| {t} | {row['gguf_py_ms']:.1f} | {t_ours * 1e3:.2f} | {row['speedup']:.0f}x | {t_kern * 1e3:.2f} | "
              f"{row['kernel_speedup']:.0f}x | {gbs:.1f} | {row['of_copy']:.0%} |", flush=True)

    print("\n## fused qmatmul (fp32 x) vs torch fp32 `x @ W.T` on the dequantized weight\n")
    print("| type | M | torch ms | pyquant ms | speedup | weight GB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for t in [t for t in FUSED_TYPES if t in qws]:
        qw = qws[t]
        w = pyquant.dequantize(qw, torch.float32, kernel="cpu")
        for m in args.m:
            x = torch.randn(m, k)
            ours = lambda: pyquant.qmatmul(x, qw, kernel="cpu")  # noqa: E731
            dense = lambda: x @ w.T  # noqa: E731
            err = (ours().double() - dense().double()).abs().max() / dense().double().abs().max()
            assert err < 1e-4, (t, m, float(err))
            (t_ours, med_ours), (t_dense, med_dense) = interleaved([ours, dense], rep_ours, clock=clock)
            row = {"type": t, "m": m, "torch_ms": t_dense * 1e3, "pyquant_ms": t_ours * 1e3,
                   "speedup": t_dense / t_ours, "weight_GBps": qw.nbytes / t_ours / 1e9,
                   "median_ms": {"torch": med_dense * 1e3, "pyquant": med_ours * 1e3}}
            results["qmatmul"].append(row)
            print(f"| {t} | {m} | {row['torch_ms']:.2f} | {row['pyquant_ms']:.2f} | {row['speedup']:.2f}x | "
                  f"{row['weight_GBps']:.1f} |", flush=True)

    results["loadavg_end"] = load_average()[0]
    print(f"\n1-min load average {results['loadavg_start']:.1f} at start, {results['loadavg_end']:.1f} at end "
          f"({os.cpu_count()} CPUs)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
