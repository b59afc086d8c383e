"""Is one variant's perplexity really different from another's? Paired bootstrap.

Quantizes a model (``--model``, as in ``quality.py``) with two variants of
``quality.py`` (the same names, peers included), computes each evaluation
sequence's mean token NLL on every set, and bootstraps the mean of the per-sequence differences (10,000
resamples of the 16 sequences): a 95% interval for ``ppl(A) / ppl(B)`` that
accounts for how much the sequences themselves vary.

    python benchmarks/quality_paired.py hqq hqq-package --model smollm2 --bits 4 --group 64 --cache /tmp/q/cache.pt
"""
from __future__ import annotations

import argparse
import copy
import math
from contextlib import nullcontext

import torch

import pyquant
import quality_peers
from quality import EVAL_SETS, MODELS, VARIANTS, build_sets, load_cached


def quantized(model, name, bits, group, calib):
    over, kind, n = VARIANTS[name]
    m = copy.deepcopy(model)
    if name == "hqq-package":
        quality_peers.hqq_package(m, bits, group)
        return m
    cfg = pyquant.QuantConfig(bits=bits, group_size=group, **over)
    peer = quality_peers.llmcompressor_gptq(bits) if name == "gptq-llmcompressor" else nullcontext()
    with peer:
        pyquant.quantize_model(m, cfg, calib(kind, n or 32) if kind else None, progress=False, verbose=False)
    return m


def sequence_nll(model, ids):
    out = []
    with torch.no_grad():
        for row in ids:
            logits = model(row[None]).logits[0, :-1]
            out.append(float(torch.nn.functional.cross_entropy(logits.float(), row[1:])))
    return torch.tensor(out, dtype=torch.float64)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--eval", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=None, help="quality.py's --cache file")
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, ids, _ = load_cached(args.model, args.cache)
    evals, calib, _ = build_sets(ids, 32, args.eval, 512)
    sets = [(corpus, title) for _, corpus, title in EVAL_SETS if corpus in evals]
    nll = {}
    for name in (args.a, args.b):
        m = quantized(model, name, args.bits, args.group, calib)
        nll[name] = [sequence_nll(m, evals[corpus]) for corpus, _ in sets]
    gen = torch.Generator().manual_seed(0)
    print(f"{args.a} vs {args.b}, {args.bits}-bit g{args.group}, {args.eval} x 512 tokens per set")
    for i, (_, label) in enumerate(sets):
        a, b = nll[args.a][i], nll[args.b][i]
        d = a - b
        boot = d[torch.randint(0, len(d), (10000, len(d)), generator=gen)].mean(1)
        lo, hi = math.exp(float(boot.quantile(0.025))), math.exp(float(boot.quantile(0.975)))
        print(f"  {label}: ppl {math.exp(float(a.mean())):.3f} vs {math.exp(float(b.mean())):.3f}, "
              f"ratio {math.exp(float(d.mean())):.4f} (95% paired bootstrap {lo:.4f} .. {hi:.4f}); "
              f"{args.a} better on {int((d < 0).sum())}/{len(d)} sequences")


if __name__ == "__main__":
    main()
