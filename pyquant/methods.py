"""The quantization methods: one table from a method name to what it does.

Both entry points read it: ``pyquant.quantize_weight`` (one weight, the
calibration-free methods) and ``pyquant.quantize_model`` (through
``QuantConfig``: which format a method builds, whether it needs calibration,
which pass of ``pyquant.pipeline.passes`` runs it, the options of its
per-weight function).

Each method's ``quantize`` is its per-weight function,
``quantize(w (N, K), fmt, **options) -> QuantizedWeight``; the calibrated ones
take their statistics as keyword arguments too (GPTQ: ``hessian``, and it
returns the solver's result, whose ``qweight`` is the QuantizedWeight; AWQ:
the clipping ``shrink`` of its scaled weight). A GGUF block type used as a
method name ("q4_0", "q4_k", ...) is round to nearest into that type.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from .errors import FormatError
from .formats import BLOCK_TYPES, Format, QuantizedWeight

# llama.cpp's type for rows that are not whole k-quant super-blocks (256 weights), except that it
# uses IQ4_NL for Q2_K/Q3_K, which pyquant does not implement.
GGUF_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


# --- per-weight functions (imported on call: importing pyquant stays light) --------------------
def _rtn(w: torch.Tensor, fmt: Format) -> QuantizedWeight:
    from .algorithms.rtn import rtn

    return rtn(w, fmt)


def _hqq(w: torch.Tensor, fmt: Format, **options) -> QuantizedWeight:
    try:
        from .algorithms.hqq import hqq_quantize
    except ImportError as exc:
        raise FormatError(f"method 'hqq' is not available in this build ({exc})") from exc
    return hqq_quantize(w, fmt, **options)


def _gptq(w: torch.Tensor, fmt: Format, *, hessian: torch.Tensor, **options):
    # The module attribute is looked up on each call: benchmarks/quality_peers.py swaps in a peer's
    # GPTQ there to run it inside pyquant's pipeline.
    from .algorithms import gptq

    return gptq.gptq_quantize(w, hessian, fmt, **options)


def _awq(w: torch.Tensor, fmt: Format, *, shrink: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """The last step of AWQ: the scaled weight, clipped by ``shrink``, rounded to nearest."""
    from .algorithms.awq import rtn_quantize

    return rtn_quantize(w, fmt, shrink)


# --- what the pipeline passes from a QuantConfig to the per-weight function ---------------------
def _gptq_config(cfg) -> Dict[str, Any]:
    return dict(
        damp=cfg.damp, block_size=cfg.block_size, static_groups=cfg.static_groups, clip=cfg.clip,
        clip_grid=cfg.clip_grid, clip_max_shrink=cfg.clip_max_shrink,
        order="hessian" if cfg.act_order == "static" else "natural", refit=cfg.gptq_refit,
    )


def _hqq_config(cfg) -> Dict[str, Any]:
    return {"zero_point": cfg.hqq_zero_point}


def _nothing(cfg) -> Dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    quantize: Callable[..., Any]  # the per-weight function (see the module docstring)
    needs_calibration: bool
    block_pass: str  # the module of pyquant.pipeline.passes that runs it in quantize_model
    # format families it quantizes into; QuantConfig builds the first
    formats: Tuple[str, ...] = ("int",)
    # keyword options of ``quantize`` a user may pass (quantize_weight's **options, method_kwargs)
    options: Tuple[str, ...] = ()
    config_options: Callable[[Any], Dict[str, Any]] = _nothing  # QuantConfig -> options
    gguf_type: Optional[str] = None  # GGUF methods: the block type

    def check_options(self, options: Mapping[str, Any], where: str = "quantize_weight") -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = f"it takes {', '.join(self.options)}" if self.options else "it takes none"
            raise FormatError(
                f"{where}: method {self.name!r} has no option {', '.join(map(repr, unknown))} ({takes})"
            )

    def check_format(self, fmt: Format) -> None:
        if fmt.family not in self.formats:
            raise FormatError(
                f"method {self.name!r} quantizes into {' or '.join(self.formats)} formats, got {fmt.describe()}"
            )
        if self.gguf_type is not None and fmt.type not in (self.gguf_type, GGUF_FALLBACK.get(self.gguf_type)):
            fallback = GGUF_FALLBACK.get(self.gguf_type)
            allowed = self.gguf_type + (f" (or its fallback {fallback})" if fallback else "")
            raise FormatError(f"method {self.name!r} quantizes into GGUF {allowed}, got GGUF {fmt.type}")


HQQ_OPTIONS = ("zero_point", "iters", "lp_norm", "beta", "kappa", "early_stop", "kernel")

METHODS: Dict[str, Method] = {
    m.name: m
    for m in (
        Method("rtn", _rtn, False, "plain", formats=("int", "nf4", "gguf")),
        Method("hqq", _hqq, False, "plain", options=HQQ_OPTIONS, config_options=_hqq_config),
        Method("gptq", _gptq, True, "gptq", config_options=_gptq_config),
        Method("awq", _awq, True, "awq"),
        Method("nf4", _rtn, False, "plain", formats=("nf4",)),
        *(Method(t.lower(), _rtn, False, "plain", formats=("gguf",), gguf_type=t) for t in BLOCK_TYPES),
    )
}


def get_method(name: str) -> Method:
    """The table entry for ``name`` (case-insensitive); FormatError naming it when unknown."""
    key = str(name).lower() if isinstance(name, str) else name
    method = METHODS.get(key)
    if method is None:
        named = [n for n, m in METHODS.items() if m.gguf_type is None]
        raise FormatError(
            f"unknown quantization method {name!r}; use one of {tuple(named)} or a GGUF type such as "
            f"'q4_0', 'q8_0', 'q4_k' ({', '.join(n for n, m in METHODS.items() if m.gguf_type)})"
        )
    return method
