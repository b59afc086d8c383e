"""AWQ's folds on a real model: where each scale went, and whether the float
model still computes what it did.

Runs ``pyquant.pipeline.passes.awq.fold_model`` (scale search and verified
folds, no rounding) on the float model, once with the family's adapter and,
with ``--no-adapter``, as a family pyquant has no adapter for (producers found
by running each block, every fold still checked). Prints where each group's
scale went and the relative change of the logits on held-out pydoc; with
``--strict`` also shows that ``awq_strict_folds=True`` refuses a family
without an adapter by name.

    python benchmarks/quality_awq_folds.py --model gemma3 --cache /tmp/q/gemma3.pt --no-adapter --strict
"""
from __future__ import annotations

import argparse
import collections
import copy
import time
from unittest import mock

import torch

import pyquant
from pyquant.pipeline import arch
from pyquant.pipeline.passes.awq import fold_model
from quality import MODELS, build_sets, load_cached


def fold_and_compare(model, cfg, calib, probe):
    m = copy.deepcopy(model)
    t = time.perf_counter()
    report = fold_model(m, cfg, calib)
    with torch.no_grad():
        ref, got = model(probe).logits, m(probe).logits
    change = float((got - ref).norm() / ref.norm())
    where = collections.Counter(r.note.split(", ", 1)[-1].split(" rows")[0] for r in report.layers)
    return change, where, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="gemma3")
    p.add_argument("--cache", default=None)
    p.add_argument("--calib", type=int, default=4, help="calibration sequences (of --seq-len tokens)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-adapter", action="store_true", help="also run as a family without an adapter")
    p.add_argument("--strict", action="store_true", help="show awq_strict_folds=True refusing that family")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, ids, _ = load_cached(args.model, args.cache)
    evals, calib, _ = build_sets(ids, 32, 1, args.seq_len)
    data, probe = calib("mix", args.calib), evals["pydoc"]
    cfg = pyquant.QuantConfig(method="awq", bits=4, group_size=64)
    family = arch.family_of(model)
    runs = [(f"adapter {family}", {})]
    if args.no_adapter:
        runs.append(("no adapter", {family: None}))
    for label, hide in runs:
        with mock.patch.dict(arch.ADAPTERS, {}, clear=False):
            for k in hide:
                arch.ADAPTERS.pop(k, None)
            change, where, sec = fold_and_compare(model, cfg, data, probe)
        print(f"{label}: logits changed by {change:.1e} (relative); {sec:.0f} s")
        for note, n in where.most_common():
            print(f"    {n:4d} layers: {note}")
    if args.strict:
        with mock.patch.dict(arch.ADAPTERS, {}, clear=False):
            arch.ADAPTERS.pop(family, None)
            try:
                fold_model(copy.deepcopy(model), pyquant.QuantConfig(method="awq", awq_strict_folds=True), data)
                print("strict, no adapter: accepted (unexpected)")
            except pyquant.FormatError as exc:
                print(f"strict, no adapter: FormatError: {exc}")


if __name__ == "__main__":
    main()
