"""HQQ: calibration-free half-quadratic quantization into the Int format.

    from pyquant.algorithms.hqq import hqq_quantize
    qw = hqq_quantize(W, Int(bits=4, group_size=64))          # W: (out, in)

HQQ minimises an l_p (p=0.7) reconstruction error per group with a
half-quadratic proximal loop. Three formulations (``zero_point=``):

* ``"anchored"`` (the default): starts from RTN's integer zero point; the
  solver moves the scale (never so far that a weight is clipped), then the
  zero point, by at most 0.1 of a step, so a weight of 0 is reproduced to a
  tenth of a step (``pyquant/algorithms/hqq_integer_zero.py``: spec, and why
  it is the default: a free float zero costs SmolLM2 2-7x perplexity at 3
  bits).
* ``"integer"``: the same without the zero step: 0 is exactly representable.
* ``"float"``: the ``hqq`` package's: min/max scale kept, a float zero point
  solved (``pyquant/algorithms/hqq_reference.py`` is the spec and explains
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

from .. import _ext
from ..errors import FormatError, KernelUnavailableError, ValueRangeError
from ..formats import Int, QuantizedWeight
from ..validation import check_finite, check_weight_2d
from .hqq_integer_zero import ZERO_SLACK, hqq_solve_integer_zero
from .hqq_reference import HQQSolution, hqq_solve_reference, solver_schedule

KERNELS = ("auto", "cpu", "reference", "triton", "cuda")
ZERO_POINTS = ("anchored", "integer", "float")
TRITON_NAME = "triton_hqq_solve"  # names verified_kernels.json would list
CUDA_NAME = "cuda_hqq_solve"
INTEGER_CPU_NAME = "hqq_solve_integer_zero_cpu"


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
    if kernel not in KERNELS:
        raise KernelUnavailableError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if zero_point not in ZERO_POINTS:
        raise ValueRangeError(f"zero_point must be one of {ZERO_POINTS}, got {zero_point!r}")
    if zero_point != "float" and kernel in ("triton", "cuda"):
        raise KernelUnavailableError(
            f"kernel={kernel!r} solves zero_point='float' only; zero_point={zero_point!r} has a CPU kernel ('cpu') "
            "and runs as torch code elsewhere ('reference')"
        )


def _ext_with(name):
    ext = _ext.load()
    return ext if ext is not None and hasattr(ext, name) else None


def _triton_usable(device: torch.device) -> bool:
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _cuda_usable(device: torch.device) -> bool:
    ext = _ext_with("hqq_solve_cuda")
    return device.type == "cuda" and ext is not None and ext.cuda_compiled()


def _pick_kernel(kernel: str, device: torch.device, zero_point: str) -> str:
    if zero_point != "float":
        if kernel == "auto":
            kernel = "cpu" if device.type == "cpu" and _ext_with(INTEGER_CPU_NAME) is not None else "reference"
        if kernel == "cpu" and (device.type != "cpu" or _ext_with(INTEGER_CPU_NAME) is None):
            raise KernelUnavailableError(f"the C++ HQQ solver needs a CPU tensor and pyquant._C (tensor on {device})")
        return "integer_" + kernel
    if kernel == "auto":
        if device.type == "cpu":
            return "cpu" if _ext_with("hqq_solve_cpu") is not None else "reference"
        from ..ops.dispatch import verified_kernels

        if CUDA_NAME in verified_kernels() and _cuda_usable(device):
            return "cuda"
        if TRITON_NAME in verified_kernels() and _triton_usable(device):
            return "triton"
        return "reference"
    if kernel == "cpu" and (device.type != "cpu" or _ext_with("hqq_solve_cpu") is None):
        raise KernelUnavailableError(f"the C++ HQQ solver needs a CPU tensor and pyquant._C (tensor on {device})")
    if kernel == "triton" and not _triton_usable(device):
        raise KernelUnavailableError(
            f"the Triton HQQ solver needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU); tensor on {device}"
        )
    if kernel == "cuda" and not _cuda_usable(device):
        raise KernelUnavailableError(
            f"the CUDA HQQ solver needs a CUDA tensor and a CUDA build of pyquant._C (tensor on {device})"
        )
    return kernel


def _triton_module():
    """``pyquant.triton_kernels``, imported lazily (its solver imports triton at the first call)."""
    from ..ops.triton_backend import kernels

    return kernels()


def _solve_cpu(w, bits, group, scale_dtype, iters, lp_norm, beta, kappa, early_stop, zero_slack=None):
    """The C++ solvers: float zero points, or (``zero_slack`` given) around integer ones."""
    from ..ops._dtypes import dtype_code

    n, k = w.shape
    sol = HQQSolution.empty(n, k, group)
    sched = solver_schedule(iters, lp_norm, beta, kappa).contiguous()
    args = (w.data_ptr(), *_out_ptrs(sol), n, k, group, bits, dtype_code(scale_dtype), iters, sched.data_ptr(),
            float(lp_norm), kappa == 1.0, bool(early_stop))
    if zero_slack is None:
        _ext.load().hqq_solve_cpu(*args, torch.get_num_threads())
    else:
        _ext.load().hqq_solve_integer_zero_cpu(*args, float(zero_slack), torch.get_num_threads())
    return sol


def _out_ptrs(sol: HQQSolution) -> tuple[int, ...]:
    """Pointers to codes, scales, zeros, err, iters: the order the C++/CUDA solvers take."""
    return tuple(t.data_ptr() for t in (sol.codes, sol.scales, sol.zeros, sol.err, sol.iters))


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
    which = _pick_kernel(kernel, w.device, zero_point)
    group = fmt.group_size_for(w.shape[1])
    args = (fmt.bits, group, fmt.scale_dtype, iters, float(lp_norm), float(beta), float(kappa), bool(early_stop))
    with torch.no_grad():
        w32 = w.detach().to(torch.float32).contiguous()
        slack = ZERO_SLACK if zero_point == "anchored" else 0.0
        if which == "integer_reference":
            sol = hqq_solve_integer_zero(w32, fmt.bits, group, fmt.scale_dtype, zero_slack=slack, iters=iters,
                                         lp_norm=float(lp_norm), beta=float(beta), kappa=float(kappa),
                                         early_stop=bool(early_stop))
        elif which == "integer_cpu":
            sol = _solve_cpu(w32, *args, zero_slack=slack)
        elif which == "reference":
            sol = hqq_solve_reference(w32, fmt.bits, group, fmt.scale_dtype, iters=iters, lp_norm=float(lp_norm),
                                      beta=float(beta), kappa=float(kappa), early_stop=bool(early_stop))
        elif which == "cpu":
            sol = _solve_cpu(w32, *args)
        elif which == "triton":
            from .hqq_reference import tiny_scale

            sol = HQQSolution(*_triton_module().hqq_solve(
                w32, fmt.bits, group, fmt.scale_dtype, float(lp_norm), float(kappa) == 1.0, bool(early_stop),
                solver_schedule(iters, float(lp_norm), float(beta), float(kappa)), tiny_scale(fmt.scale_dtype)))
        else:
            from ..ops._dtypes import dtype_code

            sol = _solve_cuda(w32, *args, dtype_code)
    if bool(torch.isinf(sol.scales).any()):
        bad = torch.isinf(sol.scales).nonzero()[0].tolist()
        raise ValueRangeError(
            f"weight range per code overflows scale dtype {fmt.scale_dtype} (row {bad[0]}, group {bad[1]}); "
            "use scale_dtype=torch.float32"
        )
    return sol


def _solve_cuda(w, bits, group, scale_dtype, iters, lp_norm, beta, kappa, early_stop, dtype_code):
    n, k = w.shape
    dev = w.device
    sol = HQQSolution.empty(n, k, group, dev)
    sched_cpu = solver_schedule(iters, lp_norm, beta, kappa)
    thr_last = float(sched_cpu[1, -1]) if iters else 0.0
    sched = sched_cpu.to(dev).contiguous()
    stream = torch.cuda.current_stream(dev).cuda_stream
    _ext.load().hqq_solve_cuda(
        w.data_ptr(), *_out_ptrs(sol),
        n, k, group, bits, dtype_code(scale_dtype), iters, sched.data_ptr(), float(lp_norm),
        thr_last, kappa == 1.0, bool(early_stop), stream,
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
