"""``QuantConfig``: what ``pyquant.quantize_model`` does to a model.

    cfg = pyquant.QuantConfig(method="gptq", bits=4, group_size=64)
    report = pyquant.quantize_model(model, cfg, calibration_ids)

Methods (the table is ``pyquant.methods.METHODS``)
--------------------------------------------------
``"rtn"``     round to nearest (no calibration)
``"gptq"``    GPTQ, block by block, true-sequential (calibration)
``"awq"``     activation-aware scaling + clipping, then RTN (calibration)
``"hqq"``     half-quadratic quantization (no calibration; pyquant.algorithms.hqq)
``"nf4"``     round to nearest into NF4 (bitsandbytes' layout; ``group_size`` is the block size)
``"q4_0"``, ``"q8_0"``, ``"q4_k"``, ... GGUF block types by round to nearest
(no calibration; ``bits``/``group_size`` do not apply). k-quants need rows of
a multiple of 256 weights; a layer whose in_features is not (SmolLM2's 576)
gets llama.cpp's fallback type when ``gguf_fallback`` is on (the default):
Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and Q2_K/Q3_K -> Q4_0 (llama.cpp
uses IQ4_NL there, which pyquant does not implement); the report's note says
which layers fell back. With ``gguf_fallback=False`` such a layer is an error.

Each option's default was chosen on SmolLM2-135M, in and out of the
calibration domain; the experiments and their numbers are in
``benchmarks/results/defaults-evidence.md`` (the whole table with these
defaults: ``benchmarks/results/quality-smollm2.md``; a second model,
Gemma-3-270M, and what the defaults do there: ``quality-gemma3.md``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Union

import torch

from .errors import FormatError, ValueRangeError
from .methods import GGUF_FALLBACK, METHODS, get_method

EVIDENCE = "benchmarks/results/defaults-evidence.md"
CALIBRATED_METHODS = tuple(name for name, m in METHODS.items() if m.needs_calibration)
INT_METHODS = tuple(name for name, m in METHODS.items() if m.formats[0] == "int")
AWQ_CLIP_MAX_GROUP = 64  # awq_clip=None clips groups up to this size

__all__ = ["QuantConfig", "GGUF_FALLBACK", "CALIBRATED_METHODS", "INT_METHODS", "AWQ_CLIP_MAX_GROUP", "EVIDENCE"]


@dataclasses.dataclass
class QuantConfig:
    """How to quantize a model. The evidence behind each default:
    ``benchmarks/results/defaults-evidence.md`` (section named after the option).

    Format
        ``method``: see the module docstring. Default ``"gptq"``.
        ``bits`` (2, 3, 4, 8) and ``group_size`` (weights sharing one scale
        along a row; -1: one per row) of the Int format; for ``"nf4"``,
        ``group_size`` is the NF4 block size and ``bits`` must be 4. Default 4
        bits, groups of 128. ``symmetric``: zero point fixed at the middle of
        the code range (default False: asymmetric, 0.0 exactly representable).
        ``scale_dtype``: how group scales are stored (default float16).
        ``nf4_double_quant``: NF4 block maxima quantized to 8 bits as QLoRA's
        double quantization (default False).

    GPTQ
        ``act_order``: None (the default) means True for GPTQ, False otherwise.
        True: columns processed in order of decreasing ``diag(H)`` and the
        permutation stored (desc_act: 37% -> 61% of SmolLM2's in-domain gap
        closed). ``"static"``: llm-compressor's static act-order (processing
        order only, plain layout; lost out of domain at 4-bit g128).
        ``static_groups``: group ranges from the weights before any GPTQ
        update (default True; kept GPTQ below RTN out of domain at g128).
        ``damp``: diagonal damping of H relative to its mean (default 0.1, ten
        times the textbook 0.01, which overfits the calibration text).
        ``block_size``: columns per lazy-update block (default 128; speed only).
        ``true_sequential``: each group's H from inputs with the earlier groups
        already quantized (default True). ``clip``: range shrink search in
        GPTQ's quantizer, None, ``"mse"`` (default: lowers the error in and out
        of domain) or ``"hessian"``, on a ``clip_grid``-point grid (20) up to
        ``clip_max_shrink`` (0.2). ``gptq_refit``: least-squares group
        parameters once the codes are fixed (``pyquant/algorithms/group_refit.py``);
        ``"scale_zero"`` (default: better in domain at every size, float zero
        points), ``"scale"`` (integer zeros, for GPTQ/AWQ checkpoint export)
        or None.

    AWQ
        ``awq_grid``: points of the scale-exponent search (default 20).
        ``awq_duo_scaling``: False ``mean|x|^a``, True ``x^a / w^(1-a)``,
        ``"both"`` (default: search both). ``awq_clip``: per-group range clip
        search; None (the default) clips groups of up to 64 columns (at g64 it
        is what closes most of the gap; at g128 it costs out-of-domain
        quality). ``awq_clip_grid`` (20) and ``awq_clip_max_shrink`` (0.5) set
        its grid. ``awq_clip_qk``: also clip q/k projections (default False:
        their error acts through the softmax). ``awq_max_rows``: output rows
        the scale search measures its loss on (default 256; None: all).
        ``awq_strict_folds``: what happens when a scale cannot be folded
        exactly into the layer that produces the group's input (a norm, a
        preceding linear). Every fold is checked on the calibration
        activations before any weight is quantized (the block's output and the
        group's input may change by a relative 1e-4 in float32); a fold that
        fails, a norm that computes neither ``x * w`` nor ``x * (1 + w)``, is
        never applied. Default False: that group stays unscaled and the report
        says why. True: the call raises naming the layer and the producer's
        class, and a model family without an adapter in
        ``pyquant.pipeline.arch`` is refused before anything changes.

    GGUF
        ``gguf_fallback``: k-quant on rows not a multiple of 256: llama.cpp's
        fallback type (default True) instead of an error.

    HQQ and options of the per-weight function
        ``hqq_zero_point``: ``"anchored"`` (default: within 0.1 step of RTN's
        integer zero; the float zero costs SmolLM2 2-7x perplexity at 3 bits),
        ``"integer"`` or ``"float"`` (the hqq package's). ``method_kwargs``:
        further keyword options of the method's per-weight function (HQQ:
        ``iters``, ``lp_norm``, ``beta``, ``kappa``, ``early_stop``,
        ``kernel``; they override the fields); an option the method does not
        take is a FormatError.
        ``hqq_fallback``: ``"block"`` (default) or None. With calibration data,
        ``quantize_model`` gives each decoder block HQQ's weights only where
        the model's next-token loss on the calibration text does not rise
        over RTN's (starting from RTN everywhere, block by block; see
        ``pyquant.pipeline.passes.hqq_checked``): at 3 bits on Gemma-3, HQQ
        alone doubles RTN's perplexity while every per-layer error ranks it
        ahead. Without calibration data, or with None, every layer gets HQQ.
        ``hqq_check_tokens``: calibration tokens the check reads (default
        4096; one model forward over them per block). The check holds a
        second copy of the selected layers' float weights while it runs.

    Calibration pass
        ``batch_size``: calibration sequences per forward (default 8).
        ``min_tokens``: fewer calibration tokens than this is an error (16).
        Use as many tokens as you can afford and mix generic text into the
        domain text (16 -> 32 sequences took GPTQ from 22% to 37% of the gap).
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    scale_dtype: torch.dtype = torch.float16
    # --- GPTQ -------------------------------------------------------------
    act_order: Optional[Union[bool, str]] = None
    static_groups: bool = True
    damp: float = 0.1
    block_size: int = 128
    true_sequential: bool = True
    clip: Optional[str] = "mse"
    clip_grid: int = 20
    clip_max_shrink: float = 0.2
    gptq_refit: Optional[str] = "scale_zero"
    # --- AWQ --------------------------------------------------------------
    awq_grid: int = 20
    awq_duo_scaling: Union[bool, str] = "both"
    awq_clip: Optional[bool] = None
    awq_clip_grid: int = 20
    awq_clip_max_shrink: float = 0.5
    awq_clip_qk: bool = False
    awq_max_rows: Optional[int] = 256
    awq_strict_folds: bool = False
    # --- GGUF / NF4 ---------------------------------------------------------
    gguf_fallback: bool = True
    nf4_double_quant: bool = False
    # --- HQQ and anything method-specific -----------------------------------
    hqq_zero_point: str = "anchored"
    hqq_fallback: Optional[str] = "block"
    hqq_check_tokens: int = 4096
    method_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # --- calibration pass ---------------------------------------------------
    batch_size: int = 8
    min_tokens: int = 16

    def __post_init__(self):
        self.method = str(self.method).lower()
        m = get_method(self.method)
        if self.clip == "none":
            self.clip = None
        if self.clip not in (None, "mse", "hessian"):
            raise ValueRangeError(f"clip must be None, 'mse' or 'hessian', got {self.clip!r}")
        if not (isinstance(self.damp, (int, float)) and self.damp > 0):
            raise ValueRangeError(f"damp must be a positive number, got {self.damp!r}")
        if self.block_size < 1:
            raise ValueRangeError(f"block_size must be >= 1, got {self.block_size!r}")
        if self.batch_size < 1:
            raise ValueRangeError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.awq_duo_scaling not in (True, False, "both"):
            raise ValueRangeError(f"awq_duo_scaling must be True, False or 'both', got {self.awq_duo_scaling!r}")
        if self.awq_grid < 1 or self.clip_grid < 1 or self.awq_clip_grid < 1:
            raise ValueRangeError("grid sizes must be >= 1")
        if not 0 <= self.clip_max_shrink < 1 or not 0 <= self.awq_clip_max_shrink < 1:
            raise ValueRangeError("max_shrink must lie in [0, 1)")
        if self.gptq_refit not in (None, "scale", "scale_zero"):
            raise ValueRangeError(f"gptq_refit must be None, 'scale' or 'scale_zero', got {self.gptq_refit!r}")
        if self.hqq_zero_point not in ("anchored", "integer", "float"):
            raise ValueRangeError(
                f"hqq_zero_point must be 'anchored', 'integer' or 'float', got {self.hqq_zero_point!r}"
            )
        if self.hqq_fallback not in (None, "block"):
            raise ValueRangeError(f"hqq_fallback must be 'block' or None, got {self.hqq_fallback!r}")
        if isinstance(self.hqq_check_tokens, bool) or not isinstance(self.hqq_check_tokens, int) \
                or self.hqq_check_tokens < 2:
            raise ValueRangeError(f"hqq_check_tokens must be an int >= 2, got {self.hqq_check_tokens!r}")
        if not isinstance(self.awq_strict_folds, bool):
            raise ValueRangeError(f"awq_strict_folds must be True or False, got {self.awq_strict_folds!r}")
        if not isinstance(self.method_kwargs, dict):
            raise ValueRangeError(f"method_kwargs must be a dict, got {type(self.method_kwargs).__name__}")
        m.check_options(self.method_kwargs, where="QuantConfig.method_kwargs")
        if m.formats[0] == "nf4" and self.bits != 4:
            raise FormatError(f"method 'nf4' stores 4 bits per weight, got bits={self.bits!r}")
        if self.act_order is None:
            self.act_order = self.method == "gptq"
        if self.awq_clip is None:
            self.awq_clip = 0 < self.group_size <= AWQ_CLIP_MAX_GROUP
        if self.act_order not in (True, False, "static"):
            raise ValueRangeError(f"act_order must be True, False or 'static', got {self.act_order!r}")
        if self.act_order and self.method != "gptq":
            raise FormatError(f"act_order needs method='gptq' (got {self.method!r})")
        self.format()  # validates bits / group_size / scale_dtype

    @property
    def is_gguf(self) -> bool:
        return METHODS[self.method].gguf_type is not None

    @property
    def needs_calibration(self) -> bool:
        return METHODS[self.method].needs_calibration

    @property
    def reads_calibration(self) -> bool:
        """Calibration data changes the result: the calibrated methods, and HQQ's block check."""
        return self.needs_calibration or (self.method == "hqq" and self.hqq_fallback is not None)

    def method_options(self) -> Dict[str, Any]:
        """The keyword options of the method's per-weight function: the config's
        fields for it, overridden by ``method_kwargs``."""
        return {**METHODS[self.method].config_options(self), **self.method_kwargs}

    def format_for(self, in_features: int):
        """The format a layer with ``in_features`` inputs gets: :meth:`format`,
        or the GGUF fallback type when a k-quant block does not fit its rows."""
        fmt = self.format()
        if self.is_gguf and self.gguf_fallback and in_features % fmt.block.block_size:
            from .formats import GGUF

            fallback = GGUF_FALLBACK.get(fmt.type)
            if fallback is not None:
                return GGUF(fallback)
        return fmt

    def format(self):
        """The storage format this config produces."""
        m = METHODS[self.method]
        if m.gguf_type is not None:
            from .formats import GGUF

            return GGUF(m.gguf_type)
        if m.formats[0] == "nf4":
            from .formats import NF4

            return NF4(self.group_size, self.nf4_double_quant)
        from .formats import Int

        return Int(self.bits, self.group_size, self.symmetric, self.scale_dtype, self.act_order is True)

    def describe(self) -> str:
        if self.is_gguf:
            return f"{self.method} (GGUF, round to nearest)"
        if METHODS[self.method].formats[0] != "int":
            return f"{self.method} ({self.format().describe()}, round to nearest)"
        extra = []
        if self.method == "gptq":
            extra.append(f"damp={self.damp:g}")
            if self.act_order:
                extra.append("act_order" if self.act_order is True else f"act_order={self.act_order}")
            if self.static_groups:
                extra.append("static_groups")
            if self.clip:
                extra.append(f"clip={self.clip}")
            if self.gptq_refit:
                extra.append(f"refit={self.gptq_refit}")
        if self.method == "hqq":
            extra.append(f"zero_point={self.method_options()['zero_point']}")
            if self.hqq_fallback:
                extra.append(f"fallback={self.hqq_fallback}")
        if self.method == "awq":
            extra.append(f"duo={self.awq_duo_scaling}")
            if self.awq_clip:
                extra.append("clip")
            if self.awq_strict_folds:
                extra.append("strict_folds")
        tail = f" ({', '.join(extra)})" if extra else ""
        return f"{self.method} {self.format().describe()}{tail}"
