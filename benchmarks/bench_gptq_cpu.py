"""GPTQ speed on the CPU: one 2048 x 2048 layer, 128 x 512 calibration tokens.

Both sides get the same Hessian ``H = 2/n X^T X`` (accumulated once, timed
separately) and quantize the same weight to int4, group 128, asymmetric.

* baseline: llm-compressor's ``quantize_weight`` (its eager torch loop; the
  Triton path needs a GPU). Its scales come from a min-max observer over the
  unmodified weight, i.e. static groups, so pyquant is run with
  ``static_groups=True, clip=None`` for the same-quality comparison, and also
  with its defaults (dynamic groups; clip="mse"). When llm-compressor cannot be
  imported, the same textbook loop is reimplemented here (``textbook_gptq``)
  and the table says so.
* quality: relative output error ``tr(dW H dW^T) / tr(W H W^T)`` on the
  calibration Hessian, and GPTQ's loss.

    python benchmarks/bench_gptq_cpu.py [--k 2048] [--tokens 65536] [--repeats 3]
    PYTHONPATH=/path/to/llmcompressor-without-deps python benchmarks/bench_gptq_cpu.py
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types

import torch

import pyquant
from pyquant.algorithms.gptq import gptq_quantize
from pyquant.algorithms.hessian import HessianAccumulator
from pyquant.formats import Int

from _timing import timed


def load_llmcompressor():
    """llm-compressor's ``quantize_weight`` without importing its package
    ``__init__`` (which pulls datasets, pandas, ...: only the GPTQ module and
    compressed-tensors are needed)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("llmcompressor")
        if spec is None:
            return None, "llm-compressor not installed"
        base = spec.submodule_search_locations[0]
        for name, sub in (("llmcompressor", ""), ("llmcompressor.modifiers", "modifiers"),
                          ("llmcompressor.modifiers.gptq", "modifiers/gptq")):
            if name not in sys.modules:
                m = types.ModuleType(name)
                m.__path__ = [os.path.join(base, sub)]
                sys.modules[name] = m
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.utils import calculate_qparams
        import llmcompressor.modifiers.gptq.gptq_quantize as mod

        version = "?"
        try:
            import importlib.metadata as md

            version = md.version("llmcompressor")
        except Exception:
            pass
        return (quantize_weight, QuantizationArgs, calculate_qparams), f"llm-compressor {version} quantize_weight"
    except Exception as exc:  # any import problem: fall back to the textbook loop
        return None, f"llm-compressor unavailable ({type(exc).__name__}: {exc})"


def llmc_runner(fns, W, H, group):
    quantize_weight, QuantizationArgs, calculate_qparams = fns
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group)
    n, k = W.shape
    wg = W.view(n, k // group, group)
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)

    def run():
        q, loss, _ = quantize_weight(W[None].clone(), H[None].clone(), scale[None], zp[None], None, args,
                                     blocksize=128, percdamp=0.01)
        return q[0]

    return run


def textbook_gptq(W, H, group, bits=4, blocksize=128, percdamp=0.01):
    """The published GPTQ loop (static min-max groups, as llm-compressor), pure torch."""
    W = W.clone()
    H = H.clone()
    n, k = W.shape
    maxq = 2**bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    wg = W.view(n, k // group, group)
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale)
    H[range(k), range(k)] += percdamp * torch.mean(torch.diag(H))
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            g = (i1 + i) // group
            q = torch.clamp(torch.round(w / scale[:, g]) + zero[:, g], 0, maxq)
            q = (q - zero[:, g]) * scale[:, g]
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q


def rel_err(W, Q, H):
    d = Q - W
    return float(((d @ H) * d).sum() / ((W @ H) * W).sum())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=128 * 512)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    k, n = args.k, args.n
    # Activations with LLM-like structure: correlated channels, a few large ones.
    mix = torch.randn(k, k) / k**0.5 + torch.eye(k)
    chan = torch.rand(k) * 2 + 0.2
    chan[torch.randperm(k)[:8]] *= 20
    acc = HessianAccumulator(k)
    t = time.perf_counter()
    for i in range(0, args.tokens, 4096):
        x = (torch.randn(min(4096, args.tokens - i), k) @ mix) * chan
        acc.add(x)
    t_h = time.perf_counter() - t
    H = acc.hessian()
    W = torch.randn(n, k) * 0.02
    fmt = Int(4, args.group)

    fns, baseline_name = load_llmcompressor()
    if fns is not None:
        base_fn = llmc_runner(fns, W, H, args.group)
    else:
        baseline_name = f"textbook GPTQ loop reimplemented here ({baseline_name})"
        base_fn = lambda: textbook_gptq(W, H, args.group)  # noqa: E731

    rows = []
    q_base, t_base, times = timed(base_fn, args.repeats)
    rows.append(("baseline: " + baseline_name, t_base, min(times), rel_err(W, q_base.float(), H)))
    cases = [
        ("pyquant static groups, no clip (same quantizer), C++", dict(static_groups=True, clip=None, kernel="cpu")),
        ("pyquant static groups, no clip, pure-torch reference", dict(static_groups=True, clip=None, kernel="reference")),
        ("pyquant dynamic groups (textbook GPTQ), C++", dict(clip=None, kernel="cpu")),
        ("pyquant defaults of the layer call + clip='mse', C++", dict(clip="mse", kernel="cpu")),
        ("pyquant static groups, no clip + refit='scale_zero', C++",
         dict(static_groups=True, clip=None, refit="scale_zero", kernel="cpu")),
        ("pyquant QuantConfig defaults (act-order, static groups, clip='mse', damp 0.1, refit='scale_zero'), C++",
         dict(static_groups=True, clip="mse", damp=0.1, refit="scale_zero", kernel="cpu",
              fmt=Int(4, args.group, act_order=True))),
    ]
    for name, kw in cases:
        kw = dict(kw)
        f = kw.pop("fmt", fmt)
        res, tm, times = timed(lambda: gptq_quantize(W, H, f, **kw), args.repeats)
        rows.append((name, tm, min(times), rel_err(W, res.qweight.dequantize(torch.float32), H)))
    rtn = pyquant.quantize_weight(W, fmt).dequantize(torch.float32)

    print(f"# GPTQ, one {n}x{k} layer, int4 g{args.group} asym, {args.tokens} calibration tokens "
          f"({torch.get_num_threads()} threads)")
    print(f"Hessian accumulation (shared by all rows): {t_h:.2f} s; RTN output error {rel_err(W, rtn, H):.4e}\n")
    print("| implementation | median s | min s | speedup vs baseline | rel. output error |")
    print("|---|---|---|---|---|")
    for name, tm, tmin, e in rows:
        print(f"| {name} | {tm:.3f} | {tmin:.3f} | {t_base / tm:.2f}x | {e:.4e} |")


if __name__ == "__main__":
    main()
