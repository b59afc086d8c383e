"""Peer libraries through the same whole-model quality run (quality.py).

* ``hqq-package``: the ``hqq`` package's ``Quantizer.quantize`` (axis 1,
  optimize=True, its defaults otherwise) on every linear layer but the head;
  its meta rounded to fp16 as ``HQQLinear`` stores it; the layer keeps the
  dequantized weight (hqq groups the flattened weight, so where the group
  does not divide a row, e.g. 576 % 128, its groups straddle rows: that is
  the package's own behaviour).
* ``gptq-llmcompressor``: pyquant's block-by-block pipeline (same calibration
  sequences, same Hessians, true-sequential), with each layer's GPTQ done by
  llm-compressor's ``quantize_weight`` at its GPTQModifier defaults (damp
  0.01, actorder "static", min-max group parameters of the unmodified
  weight), packed losslessly into pyquant's Int format (fp32 scales). Needs
  groups that divide every row (compressed-tensors has no ragged groups).

Neither peer is a test dependency: ``hqq`` comes with the ``test`` extra;
llm-compressor is for this benchmark only and its package pulls a training
stack, so install just what the GPTQ module imports:
``pip install --no-deps llmcompressor compressed-tensors && pip install loguru``.
Without it the ``gptq-llmcompressor`` rows are skipped with the reason.
"""
from __future__ import annotations

import contextlib
import functools
import types

import torch

import pyquant
from pyquant.formats import Int


def hqq_package(model, bits, group):
    from hqq.core.quantize import Quantizer

    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        w = mod.weight.detach().float()
        wq, meta = Quantizer.quantize(w, nbits=bits, group_size=group, axis=1, optimize=True, bitpack=False,
                                      device="cpu")
        meta = dict(meta, scale=meta["scale"].half().float(), zero=meta["zero"].half().float(),
                    compute_dtype=torch.float32)
        mod.weight.data.copy_(Quantizer.dequantize(wq, meta).reshape(w.shape))
    return bits + 32 / group  # fp16 scale and zero per group


def _llmcompressor_gptq(fns, bits):
    from compressed_tensors.quantization.utils import calculate_range

    quantize_weight, QuantizationArgs, calculate_qparams = fns

    def gptq_quantize(w, H, fmt, **_ignored):  # pyquant's knobs: the peer runs its own defaults
        n, k = w.shape
        g = fmt.group_size_for(k)
        if k % g:
            raise pyquant.FormatError(f"llm-compressor needs groups that divide rows: {k} % {g}")
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=g,
                                actorder="static")
        wg = w.float().view(n, k // g, g)
        scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
        q, loss, _ = quantize_weight(w.float()[None].clone(), H.float()[None].clone(), scale[None], zp[None], None,
                                     args, blocksize=128, percdamp=0.01)
        # compressed-tensors' int codes are signed ([-2^(b-1), 2^(b-1)-1], zero
        # point in that range); pyquant's are unsigned: shift both by -q_min.
        q_min, _ = calculate_range(args, w.device)
        s = scale.float()
        z = zp.float() - float(q_min)
        idx = torch.arange(k) // g
        codes = torch.round(q[0] / s[:, idx] + z[:, idx]).clamp(0, (1 << bits) - 1).to(torch.uint8)
        qweight = Int(bits, g, scale_dtype=torch.float32).pack(codes, s, z)
        return types.SimpleNamespace(qweight=qweight, loss=float(loss.sum()), damp_retries=0, dead_columns=0,
                                     damp=0.01, refit_rows=n)

    return gptq_quantize


@functools.lru_cache(maxsize=None)
def _load_llmcompressor():
    from bench_gptq_cpu import load_llmcompressor  # imports the GPTQ module only; once per process

    return load_llmcompressor()


@contextlib.contextmanager
def llmcompressor_gptq(bits):
    """pyquant's pipeline with llm-compressor's per-layer GPTQ swapped in."""
    fns, label = _load_llmcompressor()
    if fns is None:
        raise pyquant.FormatError(label)
    import pyquant.algorithms.gptq as gptq_module

    saved = gptq_module.gptq_quantize
    gptq_module.gptq_quantize = _llmcompressor_gptq(fns, bits)
    try:
        yield label
    finally:
        gptq_module.gptq_quantize = saved
