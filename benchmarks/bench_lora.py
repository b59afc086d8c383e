"""One QLoRA layer's training step on the CPU: pyquant vs peft over float and over bitsandbytes.

The issue's target shape: a 4096 x 4096 linear layer, LoRA rank 16, 2048
tokens, forward + backward (grad of x and of the adapters; the base is
frozen), two threads. Candidates, built from the same float weight and timed
in ONE process, interleaved (each repetition runs every candidate once; the
machine is shared and its load changes by the second):

* ``pyquant int4 g64``: ``pyquant.LoRALinear`` over a ``QuantLinear`` Int4
  group-64 asymmetric weight (GPTQ's storage format), the fused op.
* ``pyquant nf4``: the same over NF4 block 64 with double quantization.
* ``peft float``: peft's LoRA over a float ``nn.Linear`` (fp32, or a bf16
  weight for the bf16 rows).
* ``peft bnb nf4``: peft's LoRA over bitsandbytes' CPU ``Linear4bit`` (NF4
  block 64, double quantization), where it runs.

fp32, and bf16 activations where the CPU has bf16 arithmetic (AVX512-BF16 or
AMX; then the adapters compute in bf16 too). Reported per candidate: the best
and median step (best: the slower samples measure the neighbours' load), the
forward alone, the ratio to ``peft float`` and to ``peft bnb nf4``, and the
peak memory of one step above the resident tensors (weights, x, grad of y),
from the CPU allocator's own accounting (the profiler's memory events). What
the C++ kernels' low-rank epilogue saves is costed by timing, alone, the
``addmm_`` a separate pass over y would take (GGUF's forward still does it).
GPU targets: not measured on GPU (none was available).

``--crossover`` instead times ``qmatmul_transposed``'s two CPU strategies
(streaming C++ kernel vs C++-decoded panels + torch.mm) for M = 1..128, one
thread, process CPU time: the evidence for ``cpu_lora.PANEL_MIN_M``.

    PYTHONPATH=. python benchmarks/bench_lora.py [--quick] [--tokens 2048] [--crossover]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import pyquant  # noqa: E402
from pyquant import NF4, Int, _ext  # noqa: E402

from _timing import cpu_name, interleaved, load_average  # noqa: E402


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def peak_bytes(fn) -> int:
    """Peak of the CPU allocator's running total while fn() runs (allocations
    made before it, e.g. weights and inputs, are not counted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


class One(nn.Module):
    """A one-layer model for peft (it targets ``layer``)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def peft_model(layer, r, bnb=False):
    from peft import LoraConfig, get_peft_model

    model = One(layer)
    if bnb:
        model.is_loaded_in_4bit = True  # what peft's bitsandbytes dispatcher looks for
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["layer"], lora_dropout=0.0))


def bnb_layer(w, dtype):
    import bitsandbytes as bnb

    n, k = w.shape
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                   compress_statistics=True)
    return lin.to("cpu")


def bnb_bytes(layer) -> int:
    """Packed 4-bit weight + its (double-quantized) absmax statistics."""
    qs = layer.weight.quant_state
    total = layer.weight.numel() * layer.weight.element_size() + qs.absmax.numel() * qs.absmax.element_size()
    if getattr(qs, "state2", None) is not None:
        total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    return total


def candidates(w, r, dtype, with_bnb):
    """name -> (module, resident weight bytes of the base layer)."""
    n, k = w.shape
    out = {}
    for name, fmt in (("pyquant int4 g64", Int(4, 64)), ("pyquant nf4", NF4(64))):
        base = pyquant.QuantLinear(pyquant.quantize_weight(w, fmt))
        out[name] = (pyquant.LoRALinear(base, r, 2 * r), base.quantized_weight.nbytes)
    lin = nn.Linear(k, n, bias=False, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    out["peft float"] = (peft_model(lin, r), n * k * lin.weight.element_size())
    if with_bnb:
        try:
            layer = bnb_layer(w, dtype)
            out["peft bnb nf4"] = (peft_model(layer, r, bnb=True), bnb_bytes(layer))
        except Exception as exc:  # noqa: BLE001 - report, do not fail the run
            print(f"# peft over bitsandbytes Linear4bit unavailable: {type(exc).__name__}: {exc}")
    return out


def start_adapters(cands):
    """B away from its zero init so every path computes (after the error check, which sees the base alone)."""
    for module, _ in cands.values():
        with torch.no_grad():
            for pname, p in module.named_parameters():
                if "lora_B" in pname:
                    p.normal_(std=0.01)


def step_fns(module, x, gy):
    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(gy)

    def forward():
        with torch.no_grad():
            module(x)

    return step, forward


def run_dtype(w, args, dtype, with_bnb):
    n, k = w.shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, k, generator=gen).to(dtype).requires_grad_()
    gy = torch.randn(args.tokens, n, generator=gen).to(dtype)
    cands = candidates(w, args.rank, dtype, with_bnb)
    # B = 0: each candidate is its base layer; its error against the float product (quantization, bf16 rounding)
    errors = {}
    ref = x.detach().float() @ w.T
    for name, (module, _) in cands.items():
        with torch.no_grad():
            errors[name] = float((module(x).float() - ref).norm() / ref.norm())
    start_adapters(cands)
    fns = {name: step_fns(module, x, gy) for name, (module, _) in cands.items()}
    names = list(fns)
    steps = interleaved([fns[c][0] for c in names], args.repeat, warmup=1)
    fwds = interleaved([fns[c][1] for c in names], args.repeat, warmup=1)
    peaks = {c: peak_bytes(fns[c][0]) for c in names}
    # what a separate pass over y would cost: y += s * xa @ B.T, timed alone
    y = torch.randn(args.tokens, n, dtype=dtype)
    xa, b = torch.randn(args.tokens, args.rank, dtype=dtype), torch.randn(n, args.rank, dtype=dtype)
    ((addmm, _),) = interleaved([lambda: y.addmm_(xa, b.t(), alpha=0.5)], args.repeat, warmup=1)
    rows = []
    for c, (best, med), (fbest, _) in zip(names, steps, fwds):
        rows.append(dict(
            dtype=str(dtype).replace("torch.", ""), candidate=c, step_best_ms=best * 1e3, step_median_ms=med * 1e3,
            forward_best_ms=fbest * 1e3, peak_step_mib=peaks[c] / 2**20, weight_mib=cands[c][1] / 2**20,
            rel_err_vs_float=errors[c],
        ))
    base = {r["candidate"]: r["step_best_ms"] for r in rows}
    for r in rows:
        r["vs_peft_float"] = base["peft float"] / r["step_best_ms"]
        r["vs_peft_bnb"] = base["peft bnb nf4"] / r["step_best_ms"] if "peft bnb nf4" in base else None
    return rows, addmm * 1e3


def crossover(args):
    from pyquant.ops.backends import cpu_lora

    torch.set_num_threads(1)
    n = k = 4096
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    rows = []
    for fmt in (Int(4, 64), NF4(64)):
        qw = pyquant.quantize_weight(w, fmt)
        q, spec = qw.tensor_list(), fmt.spec()
        for m in (1, 4, 8, 16, 32, 64, 128):
            g = torch.randn(m, n)

            def run(threshold):
                def f():
                    cpu_lora.PANEL_MIN_M = threshold
                    torch.ops.pyquant.qmatmul_transposed(g, q, spec, n, k, "cpu")
                return f

            saved = cpu_lora.PANEL_MIN_M
            (kern, _), (panel, _) = interleaved([run(1 << 30), run(0)], args.repeat, warmup=1, clock=time.process_time)
            cpu_lora.PANEL_MIN_M = saved
            rows.append(dict(format=spec, m=m, kernel_ms=kern * 1e3, panels_ms=panel * 1e3))
            print(f"| {spec} | {m} | {kern * 1e3:.1f} | {panel * 1e3:.1f} |", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 512 tokens, 2 repetitions")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-bnb", action="store_true")
    p.add_argument("--crossover", action="store_true", help="time qmatmul_transposed's two CPU strategies")
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu-lora.json"))
    args = p.parse_args(argv)
    if _ext.load() is None:
        sys.exit("pyquant._C is not built; build it first (see COMMON.md)")
    if args.quick:
        args.tokens, args.repeat = 512, 2
    meta = dict(cpu=cpu_name(), threads=args.threads, load_before=load_average(), torch=torch.__version__)
    if args.crossover:
        print("| format | M | C++ kernel ms | panels + torch.mm ms |\n|---|---|---|---|")
        rows = crossover(args)
        out = os.path.join(HERE, "results", "cpu-lora-crossover.json")
        with open(out, "w") as f:
            json.dump(dict(meta, threads=1, clock="process_time", rows=rows), f, indent=2)
        return
    torch.set_num_threads(args.threads)
    w = torch.randn(args.n, args.k, generator=torch.Generator().manual_seed(0)) * 0.02
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_bf16() else [])
    rows, addmm = [], {}
    for dtype in dtypes:
        r, addmm[str(dtype)] = run_dtype(w, args, dtype, with_bnb=not args.no_bnb)
        rows += r
    meta["load_after"] = load_average()
    print(f"# one LoRA layer training step: {args.n}x{args.k}, r={args.rank}, {args.tokens} tokens, "
          f"{args.threads} threads, {meta['cpu']}; load {meta['load_before'][0]:.1f} -> {meta['load_after'][0]:.1f}")
    print("| dtype | candidate | step best ms | median | forward ms | vs peft float | vs peft bnb | "
          "peak step MiB | weight MiB | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bnb = f"{r['vs_peft_bnb']:.2f}x" if r["vs_peft_bnb"] else "-"
        print(f"| {r['dtype']} | {r['candidate']} | {r['step_best_ms']:.0f} | {r['step_median_ms']:.0f} | "
              f"{r['forward_best_ms']:.0f} | {r['vs_peft_float']:.2f}x | {bnb} | {r['peak_step_mib']:.0f} | "
              f"{r['weight_mib']:.1f} | {r['rel_err_vs_float']:.2e} |")
    for dt, ms in addmm.items():
        print(f"low-rank term as a separate pass ({dt}): its addmm_ alone takes {ms:.1f} ms per forward "
              "(the Int/NF4 kernels add it in their epilogue instead)")
    print("GPU targets (>= 1.5x peft over bitsandbytes Linear4bit, no higher peak memory): not measured on GPU")
    with open(args.out, "w") as f:
        json.dump(dict(meta, n=args.n, k=args.k, tokens=args.tokens, rank=args.rank, repeat=args.repeat,
                       rows=rows, separate_pass_addmm_ms=addmm, gpu="not measured on GPU"), f, indent=2)


if __name__ == "__main__":
    main()
