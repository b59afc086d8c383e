"""Speed of the k-quant quantizers (GGUF Q2_K..Q6_K, with and without an
importance matrix) on one weight, against baselines timed in the same process:
gguf-py's numpy Q8_0 quantizer (the peer's cheapest RTN) and pyquant's own
legacy Q4_0 RTN on the same weight, plus the pure-torch spec on a slice
(extrapolated per weight) to show what the compiled path buys.

    python benchmarks/bench_kquant.py [--shape 4096 4096] [--repeats 3] [--spec-rows 64]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

import pyquant
from pyquant.algorithms.kquant import kquant_quantize
from pyquant.formats import GGUF

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=2, default=(4096, 4096))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spec-rows", type=int, default=64, help="rows of the weight the torch spec quantizes")
    args = ap.parse_args()
    n, k = args.shape
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    im = torch.exp(torch.randn(k, generator=g))
    mw = n * k / 1e6

    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    wn = w.numpy()

    def peer():
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            gguf_quantize(wn, GGMLQuantizationType.Q8_0)

    base_peer = median_s(peer, args.repeats)
    base_q40 = median_s(lambda: pyquant.quantize_weight(w, GGUF("Q4_0")), args.repeats)
    print(f"weight {n}x{k}, {torch.get_num_threads()} threads; baselines: gguf-py Q8_0 {base_peer:.3f} s, "
          f"pyquant Q4_0 RTN {base_q40:.3f} s\n")
    print("| type | imatrix | C++ s | Mweights/s | C++ time / gguf-py Q8_0 time | C++ time / Q4_0 RTN time "
          "| torch spec s (extrapolated) | spec / C++ |")
    print("|---|---|---|---|---|---|---|---|")
    ws = w[: args.spec_rows]
    for t in TYPES:
        for imatrix in (None, im):
            fast = median_s(lambda: kquant_quantize(w, GGUF(t), imatrix, kernel="cpu"), args.repeats)
            spec = median_s(lambda: kquant_quantize(ws, GGUF(t), imatrix, kernel="reference"), 1) * n / ws.shape[0]
            print(f"| {t} | {'yes' if imatrix is not None else 'no'} | {fast:.2f} | {mw / fast:.1f} | "
                  f"{fast / base_peer:.1f}x | {fast / base_q40:.1f}x | {spec:.1f} | {spec / fast:.0f}x |")


if __name__ == "__main__":
    main()
