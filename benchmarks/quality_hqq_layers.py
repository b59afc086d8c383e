"""Which layers make HQQ worse than RTN, and what predicts it.

For one bit width and group size, every linear layer but the head is
quantized once with RTN and once with HQQ (``--zero-point``); the float
model then gets dequantized weights (fake quantization: the same numbers a
QuantLinear computes, at float speed) in these assignments:

* all RTN, all HQQ;
* HQQ everywhere but one layer kind (``q_proj``, ..., ``down_proj``) on RTN;
* with ``--per-layer``, HQQ everywhere but one layer on RTN (slow: one
  evaluation per layer).

Perplexity is estimated on ``--eval`` sequences of pydoc (in-domain) and of
licenses (out-of-domain), from the loss at every ``--stride``-th position.
Then, per layer kind, the ratio HQQ / RTN of candidate criteria: the squared
weight error, the squared sum of each group's errors, the error along each
group's weights, and the layer's output error on calibration text (diagonal
and full ``tr(dW H dW^T)``, H from ``--calib`` x 512 mixed tokens), to see
which of them ranks HQQ and RTN as the perplexity does. ``--rules``
instead compares per-group fallbacks from HQQ to RTN by such criteria.
``--model-criteria`` compares whole-model measures on the calibration text
instead (its next-token loss, the KL divergence to the float model's
predictions, the last hidden state's error): the one that ranks all-RTN and
all-HQQ as the held-out perplexity does is what HQQ's block check
(``QuantConfig.hqq_fallback``) reads.

    python benchmarks/quality_hqq_layers.py --model gemma3 --bits 3 --group 64 --cache /tmp/q/gemma3.pt
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

import pyquant
from pyquant.evaluation import perplexity
from pyquant.nn.quant_linear import default_filter
from quality import MODELS, build_sets, load_cached


def layer_inputs_gram(model, names, calib):
    """X^T X of each named linear's input over ``calib`` (one forward per sequence)."""
    mods = dict(model.named_modules())
    grams = {n: torch.zeros(mods[n].in_features, mods[n].in_features) for n in names}

    def add(name, x):  # returns None: a pre-hook's return value would replace the input
        x = x.reshape(-1, x.shape[-1]).float()
        grams[name].addmm_(x.T, x)

    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: add(n, a[0])) for n in names]
    with torch.no_grad():
        for row in calib:
            model(row[None], logits_to_keep=1)  # the head's logits are not needed here
    for h in hooks:
        h.remove()
    return grams


def criteria(w, dq_rtn, dq_hqq, gram, group):
    """Per-layer numbers for RTN and HQQ: candidate predictors of the loss."""
    out = {}
    for tag, dq in (("rtn", dq_rtn), ("hqq", dq_hqq)):
        d = dq - w
        n, k = d.shape
        dg = torch.nn.functional.pad(d, (0, (-k) % group)).view(n, -1, group)
        out[f"sse_{tag}"] = float((d * d).sum())
        out[f"bias_{tag}"] = float((dg.sum(-1) ** 2).sum())  # squared sum of each group's errors
        out[f"out_{tag}"] = float(((d @ gram) * d).sum())  # output error on calibration text
        diag = torch.diagonal(gram)
        out[f"diag_{tag}"] = float((d * d * diag).sum())  # output error, channels independent
        wg = torch.nn.functional.pad(w, (0, (-k) % group)).view(n, -1, group)
        # error along each group's own weights: the coherent (gain) part of the error
        out[f"along_{tag}"] = float(((dg * wg).sum(-1) ** 2 / (wg * wg).sum(-1).clamp_min(1e-30)).sum())
    return out


def group_rule(w, dq_rtn, dq_hqq, group, rule):
    """Per (row, group): True where HQQ's group is kept. ``along``: its error
    along the group's weights is no larger than RTN's; ``sse+along``: the
    squared error plus ``group`` times that component (a random error puts
    1/group of its energy there) is no larger than RTN's."""
    n, k = w.shape
    pad = lambda t: torch.nn.functional.pad(t, (0, (-k) % group)).view(n, -1, group)
    wg = pad(w)
    norm = (wg * wg).sum(-1).clamp_min(1e-30)

    def score(dq):
        d = pad(dq - w)
        along = (d * wg).sum(-1) ** 2 / norm
        return along if rule == "along" else (d * d).sum(-1) + group * along

    return score(dq_hqq) <= score(dq_rtn)


def mix(w, dq_rtn, dq_hqq, keep, group):
    n, k = w.shape
    pad = lambda t: torch.nn.functional.pad(t, (0, (-k) % group)).view(n, -1, group)
    return torch.where(keep[..., None], pad(dq_hqq), pad(dq_rtn)).view(n, -1)[:, :k]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="gemma3")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--zero-point", default="anchored")
    p.add_argument("--eval", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=None)
    p.add_argument("--per-layer", action="store_true")
    p.add_argument("--rules", nargs="*", default=None,
                   help="compare per-group fallback rules instead (along, sse+along); skips the swaps")
    p.add_argument("--stride", type=int, default=4, help="score every stride-th position")
    p.add_argument("--calib", type=int, default=8, help="mixed calibration sequences for the output error")
    p.add_argument("--model-criteria", action="store_true",
                   help="whole-model criteria on the calibration text instead of per-layer ones")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, ids, _ = load_cached(args.model, args.cache)
    evals, calib, _ = build_sets(ids, 32, args.eval, 512)
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and default_filter(n, m, model)}
    fmt = pyquant.QuantConfig(method="rtn", bits=args.bits, group_size=args.group).format()
    t0 = time.perf_counter()
    float_w = {n: m.weight.detach().clone() for n, m in targets.items()}
    rtn = {n: pyquant.quantize_weight(w, fmt, "rtn").dequantize(torch.float32) for n, w in float_w.items()}
    hqq = {n: pyquant.quantize_weight(w, fmt, "hqq", zero_point=args.zero_point).dequantize(torch.float32)
           for n, w in float_w.items()}
    print(f"quantized in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.rules:
        return compare_rules(args, model, targets, float_w, rtn, hqq, evals)
    if args.model_criteria:
        return compare_model_criteria(args, model, targets, float_w, rtn, hqq, evals, calib("mix", args.calib))
    grams = layer_inputs_gram(model, list(targets), calib("mix", args.calib))
    crit = {n: criteria(float_w[n], rtn[n], hqq[n], grams[n], args.group) for n in targets}

    def assign(choice):
        with torch.no_grad():
            for n, m in targets.items():
                m.weight.copy_(hqq[n] if choice(n) else rtn[n])
        return {c: perplexity(model, evals[c], stride=args.stride) for c in ("pydoc", "licenses")}

    kinds = sorted({n.rsplit(".", 1)[-1] for n in targets})
    rows = [("all rtn", assign(lambda n: False)), ("all hqq", assign(lambda n: True))]
    print(f"all rtn {rows[0][1]}\nall hqq {rows[1][1]}", flush=True)
    for kind in kinds:
        ppl = assign(lambda n: n.rsplit(".", 1)[-1] != kind)
        rows.append((f"rtn for {kind}", ppl))
        print(f"rtn for {kind}: {ppl}", flush=True)
    if args.per_layer:
        for name in targets:
            ppl = assign(lambda n: n != name)
            rows.append((f"rtn for {name}", ppl))
            print(f"rtn for {name}: {ppl}", flush=True)
    keys = ("sse", "bias", "diag", "out", "along")
    print("\n| layers | " + " | ".join(f"{k} hqq/rtn" for k in keys) + " |")
    for kind in kinds:
        names = [n for n in targets if n.endswith(kind)]
        ratio = {c: sum(crit[n][f"{c}_hqq"] for n in names) / sum(crit[n][f"{c}_rtn"] for n in names)
                 for c in keys}
        print(f"| {kind} | " + " | ".join(f"{v:.3f}" for v in ratio.values()) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows, criteria=crit), f, indent=1)


def compare_rules(args, model, targets, float_w, rtn, hqq, evals):
    """All RTN, all HQQ, and HQQ with a per-group fallback to RTN by each rule."""
    rows = []
    for rule in ("rtn", "hqq") + tuple(args.rules):
        kept, total = 0, 0
        with torch.no_grad():
            for n, m in targets.items():
                if rule in ("rtn", "hqq"):
                    m.weight.copy_(rtn[n] if rule == "rtn" else hqq[n])
                    continue
                keep = group_rule(float_w[n], rtn[n], hqq[n], args.group, rule)
                kept, total = kept + int(keep.sum()), total + keep.numel()
                m.weight.copy_(mix(float_w[n], rtn[n], hqq[n], keep, args.group))
        ppl = {c: perplexity(model, evals[c], stride=args.stride) for c in ("pydoc", "licenses")}
        share = f", HQQ kept on {100 * kept / total:.1f}% of groups" if total else ""
        rows.append((rule, ppl, kept / total if total else None))
        print(f"{rule}: {ppl}{share}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


def compare_model_criteria(args, model, targets, float_w, rtn, hqq, evals, calib):
    """Float, all RTN and all HQQ: held-out perplexity against three measures on the calibration text."""
    keep = torch.arange(0, calib.shape[1] - 1, args.stride)
    rows, ref = [], None
    for tag, weights in (("float", float_w), ("rtn", rtn), ("hqq", hqq)):
        with torch.no_grad():
            for n, m in targets.items():
                m.weight.copy_(weights[n])
            out = model(calib, output_hidden_states=True, logits_to_keep=keep)
        logp, last = out.logits.float().log_softmax(-1), out.hidden_states[-1][:, keep]
        loss = float(torch.nn.functional.nll_loss(logp.reshape(-1, logp.shape[-1]), calib[:, keep + 1].reshape(-1)))
        row = dict(variant=tag, calib_loss=loss, ppl={c: perplexity(model, evals[c], stride=args.stride)
                                                       for c in ("pydoc", "licenses")})
        if ref is None:
            ref = (logp, last)
        else:
            row["kl_to_float"] = float((ref[0].exp() * (ref[0] - logp)).sum(-1).mean())
            row["last_hidden_rel_err"] = float((last - ref[1]).norm() / ref[1].norm())
        rows.append(row)
        print(row, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
