"""HQQ on a 4096x4096 weight: pyquant's fused solver vs the hqq package, same run.

For each weight and setting, on the same weight and in the same process:

* time: pyquant's solver for the package's formulation (``hqq_solve(...,
  zero_point="float")``; ``hqq_quantize`` adds packing) vs
  hqq's optimizer (``Quantizer.optimize_weights``, the proximal solver its
  ``Quantizer.quantize``/``HQQLinear`` run; ``..._legacy`` in hqq 0.2.8) and
  hqq's whole ``Quantizer.quantize`` (once); solver and optimizer timed
  ``--repeats`` times, each candidate right next to its baseline, median reported;
* error: ``||W - W_hat||_F / ||W||_F`` and SQNR for pyquant HQQ (scales and zeros
  stored in fp16), hqq (its fp32 meta, and rounded to fp16 as HQQLinear
  stores it) and pyquant RTN; plus the share of groups where pyquant's error
  is at most hqq's. pyquant's default (``zero_point="anchored"``) solves
  another problem (zero near an integer); its time and error are listed too.

Weights: ``llm`` = N(0, 0.02^2) with Student-t(3) tails (LLM-layer scale), and
``unit`` = N(0, 1) (a scale where hqq's l_p shrinkage is active).

    PYTHONPATH=. python benchmarks/bench_hqq.py [--repeats 2] [--quick]

Writes a markdown table to stdout and JSON to benchmarks/results/hqq_<cpu>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics

import torch

import pyquant
from pyquant.algorithms.hqq import hqq_quantize, hqq_solve
from pyquant.formats import Int

from _timing import cpu_name, timed


def make_weight(kind: str, n: int, k: int) -> torch.Tensor:
    torch.manual_seed(0)  # StudentT samples from the global generator
    g = torch.Generator().manual_seed(0)
    if kind == "llm":
        w = torch.randn(n, k, generator=g) * 0.02
        tails = torch.distributions.StudentT(3.0).sample((n, k)) * 0.02
        pick = torch.rand(n, k, generator=g) < 0.1
        return torch.where(pick, tails, w)
    return torch.randn(n, k, generator=g)


def hqq_init(w, bits, group):
    """hqq's Quantizer.quantize up to the optimizer call (axis=1)."""
    W = w.float().reshape(-1, group)
    mn, mx = W.min(1, keepdim=True)[0], W.max(1, keepdim=True)[0]
    max_v = 2**bits - 1
    scale = max_v / (mx - mn)
    scale = torch.where((mx - mn).abs() <= 1e-4, torch.full_like(scale, 1.0), scale).clamp(max=2e4)
    return W, scale, -mn * scale, [0, max_v]


def group_err(w, w_hat, group):
    return ((w.double() - w_hat.double()) ** 2).view(w.shape[0], -1, group).sum(-1)


def rel(w, w_hat):
    return float((w.double() - w_hat.double()).norm() / w.double().norm())


def bench_one(w, bits, group, repeats):
    from hqq.core.quantize import Quantizer

    fmt = Int(bits, group)  # fp16 scales/zeros
    rows = {}
    # warm up both (first-call costs: extension load, allocator)
    hqq_solve(w[:64], fmt, zero_point="float")

    t_sol, t_opt, t_ours_q = [], [], []
    for _ in range(repeats):
        # candidate and baseline back to back, repeatedly (the machine is shared)
        sol, t, _ = timed(lambda: hqq_solve(w, fmt, zero_point="float"), 1)
        t_sol.append(t)
        W, scale, zero, mm = hqq_init(w, bits, group)
        _, t, _ = timed(
            lambda: Quantizer.optimize_weights(tensor=W, scale=scale, zero=zero, min_max=mm, axis=1, device="cpu"), 1
        )
        t_opt.append(t)
        qw, t, _ = timed(lambda: hqq_quantize(w, fmt, zero_point="float"), 1)
        t_ours_q.append(t)
    # once each: hqq's whole quantize (its output is what the errors compare), 20 steps for every group
    (wq_full, meta), t_quant, _ = timed(
        lambda: Quantizer.quantize(w, nbits=bits, group_size=group, axis=1, optimize=True, bitpack=False,
                                   device="cpu"), 1
    )
    sol20, t_noes, _ = timed(lambda: hqq_solve(w, fmt, early_stop=False, zero_point="float"), 1)
    # pyquant's default formulation (zero anchored near an integer): not the package's problem, timed for reference
    anchored, t_anch, _ = timed(lambda: hqq_quantize(w, fmt), 1)

    med = statistics.median
    ours = qw.dequantize()
    meta["compute_dtype"] = torch.float32
    theirs32 = Quantizer.dequantize(wq_full, meta)
    meta16 = dict(meta, scale=meta["scale"].half().float(), zero=meta["zero"].half().float())
    theirs16 = Quantizer.dequantize(wq_full, meta16)
    rtn = pyquant.quantize_weight(w, fmt).dequantize()
    e_o, e_h16 = group_err(w, ours, group), group_err(w, theirs16, group)
    rows = dict(
        bits=bits, group=group,
        t_pyquant_solver_s=med(t_sol), t_pyquant_quantize_s=med(t_ours_q), t_pyquant_solver_20steps_s=t_noes,
        t_hqq_optimizer_s=med(t_opt), t_hqq_quantize_s=t_quant,
        speedup_solver=med(t_opt) / med(t_sol), speedup_quantize=t_quant / med(t_ours_q),
        times_pyquant_solver_s=t_sol, times_hqq_optimizer_s=t_opt,
        mean_steps_pyquant=float(sol.iters.double().mean()),
        rel_err_pyquant=rel(w, ours), rel_err_hqq_fp16=rel(w, theirs16), rel_err_hqq_fp32=rel(w, theirs32),
        rel_err_rtn=rel(w, rtn), rel_err_pyquant_anchored=rel(w, anchored.dequantize()), t_pyquant_anchored_s=t_anch,
        rel_err_pyquant_20steps=float(sol20.err.double().sum().sqrt() / w.double().norm()),
        groups_pyquant_le_hqq=float((e_o <= e_h16 * (1 + 1e-5)).double().mean()),  # 1e-5: fp32 sums
        worst_group_ratio_vs_hqq=float((e_o / e_h16.clamp_min(1e-30)).max()),
        groups_pyquant_le_rtn=float((e_o <= group_err(w, rtn, group) * (1 + 1e-5)).double().mean()),
    )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one weight, one setting")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import hqq

    plan = [("llm", 4, 64), ("llm", 4, 128), ("llm", 2, 64), ("llm", 8, 128), ("unit", 4, 64), ("unit", 2, 64)]
    if args.quick:
        plan = plan[:1]
    results = []
    weights = {}
    for kind, bits, group in plan:
        w = weights.setdefault(kind, make_weight(kind, 4096, 4096))
        r = bench_one(w, bits, group, args.repeats)
        r["weight"] = kind
        results.append(r)
        print(f"# done {kind} int{bits} g{group}: solver {r['t_pyquant_solver_s']:.3f}s vs hqq optimizer "
              f"{r['t_hqq_optimizer_s']:.2f}s", flush=True)

    print()
    print(f"HQQ 4096x4096, {cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
          f"hqq {getattr(hqq, '__version__', '?')}, SIMD {pyquant._ext.load().simd_level()}, "
          f"median of {args.repeats}")
    print()
    print("| weight | bits | group | pyquant solver s | hqq optimizer s | speedup | pyquant quantize s | "
          "hqq quantize s | speedup | steps | rel err pyquant | rel err hqq (fp16) | rel err hqq (fp32) | "
          "rel err RTN | groups <= hqq | anchored (default) s | rel err anchored |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['weight']} | {r['bits']} | {r['group']} | {r['t_pyquant_solver_s']:.3f} | "
              f"{r['t_hqq_optimizer_s']:.2f} | {r['speedup_solver']:.0f}x | {r['t_pyquant_quantize_s']:.3f} | "
              f"{r['t_hqq_quantize_s']:.2f} | {r['speedup_quantize']:.0f}x | {r['mean_steps_pyquant']:.1f} | "
              f"{r['rel_err_pyquant']:.5f} | {r['rel_err_hqq_fp16']:.5f} | {r['rel_err_hqq_fp32']:.5f} | "
              f"{r['rel_err_rtn']:.5f} | {r['groups_pyquant_le_hqq']:.4f} | {r['t_pyquant_anchored_s']:.3f} | "
              f"{r['rel_err_pyquant_anchored']:.5f} |")
    payload = dict(
        benchmark="hqq_4096x4096", cpu=cpu_name(), threads=args.threads, torch=torch.__version__,
        hqq=getattr(hqq, "__version__", None), simd=pyquant._ext.load().simd_level(), repeats=args.repeats,
        settings=dict(iters=20, lp_norm=0.7, beta=10.0, kappa=1.01, early_stop=True, axis=1, scale_dtype="fp16"),
        results=results,
    )
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        "hqq_" + re.sub(r"[^A-Za-z0-9]+", "_", cpu_name()).strip("_").lower() + ".json",
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
