"""``QuantConfig``: what ``pyquant.quantize_model`` does to a model.

    cfg = pyquant.QuantConfig(method="gptq", bits=4, group_size=64)
    report = pyquant.quantize_model(model, cfg, calibration_ids)

Methods
-------
``"rtn"``     round to nearest (no calibration)
``"gptq"``    GPTQ, block by block, true-sequential (calibration)
``"awq"``     activation-aware scaling + clipping, then RTN (calibration)
``"hqq"``     half-quadratic quantization (no calibration; pyquant.algorithms.hqq)
``"q4_0"``, ``"q8_0"``, ``"q4_k"``, ... GGUF block types by round to nearest
(no calibration; ``bits``/``group_size`` do not apply). k-quants need rows of
a multiple of 256 weights; a layer whose in_features is not (SmolLM2's 576)
gets llama.cpp's fallback type when ``gguf_fallback`` is on (the default):
Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and Q2_K/Q3_K -> Q4_0 (llama.cpp
uses IQ4_NL there, which pyquant does not implement); the report's note says
which layers fell back. With ``gguf_fallback=False`` such a layer is an error.

Defaults and why (SmolLM2-135M, benchmarks/quality_smollm2.py)
---------------------------------------------------------------
Textbook GPTQ (damp 0.01, 32 x 512 pydoc tokens, no clip) closes 31% (4-bit
g64) / 48% (3-bit) of RTN's in-domain perplexity gap but is worse than RTN
out of domain (+2% / +41%): it overfits the calibration text. Defaults here:

* ``damp=0.1``: ten times the textbook damping pulls the solution towards RTN
  in directions the calibration data barely covers;
* ``clip="mse"``: each group's range is shrunk where that lowers its squared
  error (GPTQ's ``mse`` quantizer option, 20-point grid, up to 20%); it
  lowers the base error both in and out of domain;
* calibration: mix generic text into the domain text (the benchmark uses half
  pydoc, half package descriptions) and use as many tokens as you can afford:
  16 -> 32 sequences of 512 took GPTQ 4-bit g64 from 22% to 37% of the gap
  closed, out-of-domain 5% better than RTN both times;
* ``act_order`` on for GPTQ (columns in order of decreasing ``diag(H)``, the
  format stores ``perm``): with 32 mixed sequences, 4-bit g64 went from 37% to
  61% of the in-domain gap closed and out of domain from -5% to -22% vs RTN.
  It costs a gather of ``x`` by ``perm`` in each matmul; pass
  ``act_order=False`` for the plain layout.

* ``act_order="static"`` (llm-compressor's default: columns processed in
  order of decreasing ``diag(H)``, groups and layout unchanged, so inference
  needs no gather) is available but not the default: with the other defaults
  it closes a little more of the in-domain gap but loses out of domain, at
  4-bit g128 below RTN (4-bit g64 11.09 / 16.10, g128 11.37 / 18.43, 3-bit
  g64 14.49 / 39.61, g128 15.41 / 70.93; desc_act: 11.17 / 14.08,
  11.34 / 15.89, 14.59 / 46.41, 15.61 / 52.67; RTN at 4-bit g128: 16.01).
* ``gptq_refit="scale_zero"``: once GPTQ has fixed every code, each group's
  (scale, zero) is re-solved by least squares on the same damped output
  error (one small linear system per row, about as much work again as the
  column loop). It lowered in-domain perplexity at every size tried, and
  out-of-domain perplexity at all but one (4-bit g64 11.09 / 13.49 vs
  11.17 / 14.08 without it; g128 11.12 / 15.99 vs 11.34 / 15.89, 0.6% worse
  out of domain but still below RTN's 16.01; 3-bit g64 14.07 / 44.58 vs
  14.59 / 46.41; g128 14.81 / 46.37 vs 15.61 / 52.67). Over three disjoint
  calibration samples at 4-bit g64 (``--calib-draw``) it averaged
  10.96 / 13.08 vs 11.06 / 13.54 without it; over four, 11.01 / 13.13 vs
  llm-compressor's GPTQ on the same inputs 11.04 / 15.89. The zero points
  become floats (as HQQ's). ``"scale"`` keeps them integers (GPTQ/AWQ
  checkpoint export) and about half of the layer-wise error reduction; on
  the model it was 11.04 / 12.92, 11.24 / 16.92, 14.35 / 40.69 and
  14.52 / 37.15 (same order), i.e. worse than RTN out of domain at 4-bit
  g128, so it is the export option rather than the default.
* ``static_groups`` on for GPTQ: each group's range comes from the weights
  before any update (as llm-compressor does with act-order), so the ranges do
  not follow the error GPTQ pushes into later columns. At 4-bit g128 (32 mixed
  sequences, 16 x 512 eval tokens per set; float 9.87 / 9.91, RTN 13.22 /
  16.01) per-group ranges computed as the updates arrive left GPTQ 5.8% worse
  than RTN out of domain (11.53 / 16.93); static ranges: 11.34 / 15.89
  (-0.7%), with more of the in-domain gap closed (56% vs 51%). Without
  act-order it was 18.52 (+16%); damp=1.0 instead: 16.18 (+1.1%). At 3-bit
  g64 static ranges close 75% of the gap and are 28% better than RTN out of
  domain.
* AWQ clipping (``awq_clip``) only for groups of up to 64 columns: the clip
  search shrinks ranges by up to half to fit the calibration outputs, which at
  g128 costs out-of-domain quality (4-bit g128: clip 11.47 / 16.21, +1.3% vs
  RTN; max shrink 0.2: +1.9%; no clip: 11.75 / 15.99, -0.1%), while at g64 it
  is what lets AWQ close 57% / 61% of the in-domain gap (no clip at 3-bit g64:
  35%).
* Calibration: the benchmark uses half pydoc, half package descriptions for
  both methods. A quarter pydoc helped GPTQ at g128 (57% / -1.9%) but hurt
  AWQ (+6.5% out of domain), so it is not the recommendation.

* HQQ ``hqq_zero_point="anchored"``: the zero point starts at RTN's integer,
  the solver moves the scale (never clipping a weight), then the zero by at
  most 0.1 of a step (``pyquant/algorithms/hqq_integer_zero.py`` says why:
  near-zero weights in the columns of attention-sink / massive activations).
  Perplexity in / out of domain, 16 x 512 tokens per set:

  =========  ===============  ===============  ===============  ================
  zero        4-bit g64        4-bit g128       3-bit g64        3-bit g128
  =========  ===============  ===============  ===============  ================
  RTN         12.86 / 16.31    13.22 / 16.01    28.37 / 64.60    51.56 / 147.19
  float       12.03 / 13.80    13.32 / 21.49    66.52 / 275.79   146.02 / 485.06
  integer     12.66 / 16.65    12.85 / 15.64    26.90 / 54.28    40.20 / 99.00
  anchored    12.07 / 13.94    13.01 / 15.86    27.43 / 56.74    39.34 / 95.96
  =========  ===============  ===============  ===============  ================

  "float" is the hqq package's formulation (lowest weight error); "integer"
  keeps 0 exact. A slack of 0.21 steps at 4 bits (the same offset relative
  to the range as 0.1 at 3 bits) went to 17.63 out of domain at g128.

benchmarks/results/quality-smollm2.md has the whole table with these defaults.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Union

import torch

from .errors import FormatError, ValueRangeError

CALIBRATED_METHODS = ("gptq", "awq")
# llama.cpp's choice for rows that are not whole k-quant super-blocks, except
# that it uses IQ4_NL for Q2_K/Q3_K.
GGUF_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
INT_METHODS = ("rtn", "gptq", "awq", "hqq")
AWQ_CLIP_MAX_GROUP = 64  # awq_clip=None clips groups up to this size


@dataclasses.dataclass
class QuantConfig:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    scale_dtype: torch.dtype = torch.float16
    # --- GPTQ -------------------------------------------------------------
    # None: on for GPTQ (see above), off otherwise. True: desc_act (stored permutation); "static":
    # llm-compressor's static act-order (processing order only, plain layout, static groups)
    act_order: Optional[Union[bool, str]] = None
    static_groups: bool = True  # group ranges from the weights before any GPTQ update (see above)
    damp: float = 0.1
    block_size: int = 128
    true_sequential: bool = True
    clip: Optional[str] = "mse"  # None | "mse" | "hessian": group range shrink search in GPTQ's quantizer
    clip_grid: int = 20
    clip_max_shrink: float = 0.2
    # None | "scale" | "scale_zero": least-squares group parameters once the codes are fixed
    # (pyquant/algorithms/group_refit.py; see above). "scale_zero" stores float zero points, which
    # GPTQ/AWQ checkpoints cannot hold: use "scale" (integer zeros) or None to export to those.
    gptq_refit: Optional[str] = "scale_zero"
    # --- AWQ --------------------------------------------------------------
    awq_grid: int = 20
    awq_duo_scaling: Union[bool, str] = "both"  # False: mean|x|^a; True: x^a / w^(1-a); "both": search both
    awq_clip: Optional[bool] = None  # None: on for groups of <= 64 columns, off for larger groups (see above)
    awq_clip_grid: int = 20
    awq_clip_max_shrink: float = 0.5
    awq_clip_qk: bool = False  # AWQ does not clip q/k (their error acts through softmax)
    awq_max_rows: Optional[int] = 256  # output rows the scale search measures its loss on (None: all)
    # --- GGUF ---------------------------------------------------------------
    gguf_fallback: bool = True  # k-quant on rows not a multiple of 256: llama.cpp's fallback type
    # --- HQQ and anything method-specific -----------------------------------
    hqq_zero_point: str = "anchored"  # "anchored" | "integer" | "float" (the hqq package's); see above
    method_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # --- calibration pass ---------------------------------------------------
    batch_size: int = 8  # calibration sequences per forward
    min_tokens: int = 16  # fewer calibration tokens than this is an error

    def __post_init__(self):
        self.method = str(self.method).lower()
        if not self.is_gguf and self.method not in INT_METHODS:
            raise FormatError(
                f"unknown quantization method {self.method!r}; use one of {INT_METHODS} or a GGUF type "
                "such as 'q4_0', 'q8_0', 'q4_k'"
            )
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
        return self.method.startswith("q") and "_" in self.method

    @property
    def needs_calibration(self) -> bool:
        return self.method in CALIBRATED_METHODS

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
        if self.is_gguf:
            from .formats import GGUF

            return GGUF(self.method.upper())
        from .formats import Int

        return Int(self.bits, self.group_size, self.symmetric, self.scale_dtype, self.act_order is True)

    def describe(self) -> str:
        if self.is_gguf:
            return f"{self.method} (GGUF, round to nearest)"
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
            extra.append(f"zero_point={self.method_kwargs.get('zero_point', self.hqq_zero_point)}")
        if self.method == "awq":
            extra.append(f"duo={self.awq_duo_scaling}")
            if self.awq_clip:
                extra.append("clip")
        tail = f" ({', '.join(extra)})" if extra else ""
        return f"{self.method} {self.format().describe()}{tail}"
