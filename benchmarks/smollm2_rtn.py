"""The main job: SmolLM2-135M from its GGUF file, RTN int4, before/after.

Loads the model with pyquant's own GGUF reader (the float model is the
dequantized GGUF weights), measures perplexity on held-out pydoc text,
replaces every linear layer but the head with RTN int4 QuantLinear modules,
measures again, and reports the weight sizes and qmatmul speed against torch's
dense matmul on this machine's layer shapes.

    python benchmarks/smollm2_rtn.py [--group-size 128] [--segments 8] [--seq-len 512]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import pyquant
from pyquant.evaluation import calibration_and_eval, perplexity, smollm2_gguf_path
from pyquant.formats import Int
from pyquant.integrations.transformers import load_gguf_llama
from pyquant.nn import QuantLinear


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def linear_bytes(model):
    dense = packed = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            dense += mod.in_features * mod.out_features * 2  # as fp16
            packed += mod.quantized_weight.nbytes
    return dense, packed


def speed_table(group_size: int, repeats: int):
    shapes = [(1536, 576), (576, 1536), (576, 576), (192, 576), (4096, 4096)]
    rows = []
    for n, k in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k) / k**0.5
        qw = pyquant.quantize_weight(w, Int(4, group_size, False))
        for m in (1, 16):
            x = torch.randn(m, k)
            t_dense = median_ms(lambda: x @ w.T, repeats)
            t_q = median_ms(lambda: pyquant.qmatmul(x, qw), repeats)
            rows.append(dict(n=n, k=k, m=m, dense_ms=t_dense, qmatmul_ms=t_q, speedup=t_dense / t_q))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--segments", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None, help="also write results here")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    path = smollm2_gguf_path()
    t0 = time.perf_counter()
    model, tokenizer = load_gguf_llama(path, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    _, evals = calibration_and_eval(tokenizer, 0, args.segments, args.seq_len)
    ppl_float = perplexity(model, evals)

    fmt = Int(bits=4, group_size=args.group_size, symmetric=False)
    t0 = time.perf_counter()
    pyquant.replace_linear(model, fmt)
    quant_s = time.perf_counter() - t0
    ppl_q = perplexity(model, evals)
    dense, packed = linear_bytes(model)
    speed = speed_table(args.group_size, args.repeats)

    print(f"# SmolLM2-135M-Instruct, RTN {fmt.describe()} ({platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"model file: {path}")
    print(f"load {load_s:.1f} s, quantize {quant_s:.1f} s; backend: {pyquant.env()['cpu_simd'] or 'reference'}\n")
    print("| | perplexity (held-out pydoc, %d x %d tokens) |" % (args.segments, args.seq_len))
    print("|---|---|")
    print(f"| float (dequantized GGUF) | {ppl_float:.3f} |")
    print(f"| RTN {fmt.spec()} | {ppl_q:.3f} |\n")
    print(f"linear weights: {dense / 2**20:.1f} MiB as fp16 -> {packed / 2**20:.1f} MiB packed "
          f"({dense / packed:.2f}x smaller, {packed * 8 / (dense / 2):.3f} bits/weight)\n")
    print("| N x K | M | torch fp32 x@W.T (ms) | pyquant.qmatmul (ms) | speedup |")
    print("|---|---|---|---|---|")
    for r in speed:
        print(f"| {r['n']}x{r['k']} | {r['m']} | {r['dense_ms']:.3f} | {r['qmatmul_ms']:.3f} | {r['speedup']:.2f}x |")
    result = dict(ppl_float=ppl_float, ppl_rtn=ppl_q, format=fmt.spec(), dense_fp16_bytes=dense,
                  packed_bytes=packed, speed=speed, env=pyquant.env())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
