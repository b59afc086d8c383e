"""HQQ: calibration-free half-quadratic quantization into the Int format.

    from pyquant.algorithms.hqq import hqq_quantize
    qw = hqq_quantize(W, Int(bits=4, group_size=64))          # W: (out, in)

HQQ minimises an l_p (p=0.7) reconstruction error per group with a
half-quadratic proximal loop. Three formulations (``zero_point=``):

* ``"anchored"`` (the default): starts from RTN's integer zero point; the
  solver moves the scale (never so far that a weight is clipped), then the
  zero point, by at most 0.1 of a step, so a weight of 0 is reproduced to a
  tenth of a step (``pyquant/ops/reference/hqq_integer_zero.py``: spec, and why
  it is the default: a free float zero costs SmolLM2 2-7x perplexity at 3
  bits).
* ``"integer"``: the same without the zero step: 0 is exactly representable.
* ``"float"``: the ``hqq`` package's: min/max scale kept, a float zero point
  solved (``pyquant/ops/reference/hqq.py`` is the spec and explains
  the algorithm); the lowest weight error, and what the fused kernels solve.

The result is an ordinary asymmetric ``Int`` weight (``W_hat = (q - z) * s``;
float zero points are part of that format).

How ``zero_point="float"`` relates to the ``hqq`` package (0.2.8)
----------------------------------------------------------------
* Same init (``s = (max - min) / (2**bits - 1)``, ``z = -min / s``), same
  proximal step, same parameters (``lp_norm=0.7, beta=10, kappa=1.01,
  iters=20``). Note that hqq's default optimizer (``..._legacy``) is handed
  ``kappa=1.01`` but never grows beta; ``kappa=1.0`` reproduces its iteration
  exactly. Shrinkage only acts on errors above ``beta**(-1/(2-p))`` (0.17 for
  the defaults), so for LLM-scale weights (|W| ~ 0.02) kappa changes nothing.
* Scores every iterate with the stored (``scale_dtype``-rounded) scale and
  zero and keeps each group's best; adds pyquant's RTN as a second candidate.
  So each group's error is never above RTN's (up to fp32 summation), and with
  ``kappa=1`` hqq's own final iterate is among the scored ones, except where
  last-bit differences (hqq divides by 1/s, sums in another order) lead a
  group to another fixed point. Measured: the total error is 0.5-3 % below
  hqq's (benchmarks/bench_hqq.py, tests/algorithms/test_hqq.py).
* Early stopping is per group and exact: a group stops when its iteration
  reached a fixed point. Groups of small-magnitude weights (LLM layers) get
  there in 3-6 steps; hqq's whole-tensor early stop usually runs 13-20.
* Ragged groups (``K % group_size != 0``) are allowed.

``axis``
--------
``axis=1`` (the default) groups along the input dimension, the Int layout:
the result has the weight's shape ``(N, K)``. ``axis=0`` groups along the
output dimension; the Int format only groups within a stored row, so the
result is the quantized *transpose*: a QuantizedWeight of shape ``(K, N)`` with
``dequantize(qw).T ~ W``. It suits weights used as ``x @ W`` (not as an
``nn.Linear`` weight). Note that hqq's own ``axis=0`` groups with
``W.reshape(group_size, -1)``, i.e. strided rows ``{i, i + N/g, i + 2N/g, ...}``
of a column, not consecutive ones; when ``g`` divides ``N``,
``hqq_quantize(W[p], fmt, axis=0)`` with ``p = arange(N).view(g, N // g).T.flatten()``
has exactly hqq's groups. Here ``N`` need not be a multiple of the group size.

Backends (``kernel=``) for ``zero_point="float"``: ``"cpu"`` (C++ OpenMP +
AVX2/FMA, the default on CPU), ``"reference"`` (pure torch, any device),
``"triton"`` and ``"cuda"`` (fused one-launch solvers; on a GPU, "auto" picks
them only once a GPU run lists them in ``pyquant/ops/verified_kernels.json``).
``"anchored"`` and ``"integer"``: ``"cpu"`` (C++ OpenMP, the default on CPU)
and ``"reference"`` (pure torch, any device; what "auto" runs on a GPU).
"""
from __future__ import annotations

import math

import torch

from ..errors import FormatError, KernelUnavailableError, ValueRangeError
from ..formats import Int, QuantizedWeight
from ..ops import solvers
from ..ops.reference.hqq import HQQSolution
from ..ops.reference.hqq_integer_zero import ZERO_SLACK
from ..validation import check_finite, check_weight_2d

ZERO_POINTS = ("anchored", "integer", "float")


def _check_params(fmt, axis, iters, lp_norm, beta, kappa, kernel, zero_point):
    if not isinstance(fmt, Int):
        raise FormatError(f"HQQ quantizes into the Int format, got {type(fmt).__name__} ({fmt!r})")
    if fmt.symmetric:
        raise FormatError(f"HQQ optimizes zero points and needs an asymmetric format, got {fmt.spec()}")
    if fmt.act_order:
        raise FormatError(f"HQQ has no column order (act_order); got {fmt.spec()}")
    if axis not in (0, 1):
        raise ValueRangeError(f"axis must be 0 or 1, got {axis!r}")
    if not isinstance(iters, int) or isinstance(iters, bool) or not 0 <= iters <= 10000:
        raise ValueRangeError(f"iters must be an int in [0, 10000], got {iters!r}")
    if not (isinstance(lp_norm, (int, float)) and 0.0 < lp_norm <= 1.0):
        raise ValueRangeError(f"lp_norm must be in (0, 1], got {lp_norm!r}")
    if not (isinstance(beta, (int, float)) and 0.0 < beta < float("inf")):
        raise ValueRangeError(f"beta must be a positive finite number, got {beta!r}")
    if not (isinstance(kappa, (int, float)) and 1.0 <= kappa < float("inf")):
        raise ValueRangeError(f"kappa must be a finite number >= 1, got {kappa!r}")
    if iters and math.log(beta) + (iters - 1) * math.log(kappa) > 700.0:  # beyond ~1e304
        raise ValueRangeError(f"beta * kappa**(iters-1) overflows: beta={beta}, kappa={kappa}, iters={iters}")
    if zero_point not in ZERO_POINTS:
        raise ValueRangeError(f"zero_point must be one of {ZERO_POINTS}, got {zero_point!r}")
    if zero_point != "float" and kernel in ("triton", "cuda"):
        raise KernelUnavailableError(
            f"kernel={kernel!r} solves zero_point='float' only; zero_point={zero_point!r} has a CPU kernel ('cpu') "
            "and runs as torch code elsewhere ('reference')"
        )


def hqq_solve(
    w: torch.Tensor,
    fmt: Int,
    *,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    early_stop: bool = True,
    kernel: str = "auto",
    zero_point: str = "anchored",
) -> HQQSolution:
    """Codes, stored scales/zeros and per-group squared errors of ``w`` (N, K)
    grouped along K (no packing). Validates like :func:`hqq_quantize`."""
    check_weight_2d("weight", w)
    _check_params(fmt, 1, iters, lp_norm, beta, kappa, kernel, zero_point)
    fmt.check_shape(tuple(w.shape))
    check_finite("weight", w)
    group = fmt.group_size_for(w.shape[1])
    params = dict(iters=iters, lp_norm=float(lp_norm), beta=float(beta), kappa=float(kappa),
                  early_stop=bool(early_stop), kernel=kernel)
    with torch.no_grad():
        w32 = w.detach().to(torch.float32).contiguous()
        if zero_point == "float":
            sol = solvers.hqq_solve(w32, fmt.bits, group, fmt.scale_dtype, **params)
        else:
            slack = ZERO_SLACK if zero_point == "anchored" else 0.0
            sol = solvers.hqq_solve_integer_zero(w32, fmt.bits, group, fmt.scale_dtype, zero_slack=slack, **params)
    if bool(torch.isinf(sol.scales).any()):
        bad = torch.isinf(sol.scales).nonzero()[0].tolist()
        raise ValueRangeError(
            f"weight range per code overflows scale dtype {fmt.scale_dtype} (row {bad[0]}, group {bad[1]}); "
            "use scale_dtype=torch.float32"
        )
    return sol


def hqq_quantize(
    w: torch.Tensor,
    fmt: Int,
    *,
    axis: int = 1,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    early_stop: bool = True,
    kernel: str = "auto",
    zero_point: str = "anchored",
) -> QuantizedWeight:
    """Quantize ``w`` (out_features, in_features) into the asymmetric Int ``fmt`` with HQQ.

    ``axis=1`` groups along the input dimension and returns a weight of shape
    ``(N, K)``; ``axis=0`` groups along the output dimension and returns the
    quantized transpose, shape ``(K, N)`` (see the module docstring).
    ``kernel``: "auto", "cpu", "reference", "triton" or "cuda".
    ``zero_point``: "anchored" (default), "integer" or "float" (the ``hqq``
    package's formulation); see the module docstring.
    Raises FormatError (symmetric / act_order / non-Int format), ValueRangeError
    (NaN/Inf weights, bad solver parameters, a scale overflowing scale_dtype),
    ShapeError/DtypeError (not a 2-D float tensor), KernelUnavailableError.
    """
    check_weight_2d("weight", w)
    _check_params(fmt, axis, iters, lp_norm, beta, kappa, kernel, zero_point)
    if axis == 0:
        w = w.t()
    sol = hqq_solve(w, fmt, iters=iters, lp_norm=lp_norm, beta=beta, kappa=kappa, early_stop=early_stop,
                    kernel=kernel, zero_point=zero_point)
    return fmt.pack(sol.codes, sol.scales, sol.zeros)
