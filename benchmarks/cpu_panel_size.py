"""The exact-path CPU qmatmul at large M for several panel sizes, against dense fp32.

At large M a GGUF weight's exact fp32 product (``cpu_activations("fp32")``)
decodes row panels, each multiplied by torch's GEMM
(``pyquant/ops/backends/cpu_panels.py``; Int and NF4 have C++ GEMMs instead).
Q4_K here. Every panel is two parallel
regions and a GEMM of few columns, so the panel size matters most when the
machine is busy. This times, interleaved (each round calls every candidate
once, so load changes hit all alike), ``torch.mm`` on the dequantized weight
and the exact path with each ``PANEL_FLOATS``; run it on a quiet machine and
with a busy one beside it.

    python benchmarks/cpu_panel_size.py --m 512 1024 --rounds 8
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import pyquant
from pyquant.formats import GGUF
from pyquant.ops.backends import cpu_panels
from pyquant.ops.backends.cpu_activations import cpu_activations

SIZES_MIB = (4, 16)  # larger panels change nothing at 4096 rows: a panel is at most a quarter of them


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    qw = pyquant.quantize_weight(torch.randn(args.n, args.k), GGUF("Q4_K"), "rtn")
    dense_w = qw.dequantize(torch.float32)
    default = cpu_panels.PANEL_FLOATS
    for m in args.m:
        x = torch.randn(m, args.k)

        def panels(mib):
            def call():
                cpu_panels.PANEL_FLOATS = mib << 18  # fp32 values in mib MiB
                try:
                    with cpu_activations("fp32"):
                        pyquant.qmatmul(x, qw, kernel="cpu")
                finally:
                    cpu_panels.PANEL_FLOATS = default
            return call

        cands = {"dense": lambda: torch.mm(x, dense_w.t()), **{f"{s} MiB": panels(s) for s in SIZES_MIB}}
        times = {name: [] for name in cands}
        for f in cands.values():
            f()
        for _ in range(args.rounds):
            for name, f in cands.items():
                t0 = time.perf_counter()
                f()
                times[name].append((time.perf_counter() - t0) * 1e3)
        dense = statistics.median(times["dense"])
        rows = cpu_panels.panel_rows(args.n, args.k)
        print(f"M={m} (default: {rows} rows per panel)")
        for name, t in times.items():
            med = statistics.median(t)
            print(f"  {name:>8s}: median {med:7.1f} ms  min {min(t):7.1f} ms  {dense / med:.2f}x dense")


if __name__ == "__main__":
    main()
