"""GPTQ (Frantar et al., 2022): one layer, given the Hessian of its inputs.

For ``W`` (N x K) and ``H = 2/n X^T X`` (K x K), columns are quantized one at
a time; the error of column ``i`` is spread over the not-yet-quantized
columns through the upper Cholesky factor ``U`` of ``H^-1``
(``W[:, j] -= (w_i - q_i) / U[i, i] * U[i, j]``, j > i), which minimises the
layer's output error on the calibration inputs.

Implementation (the textbook algorithm, with these choices):

* Damping: ``H += damp * mean(diag(H)) * I``; when the Cholesky
  factorisation still fails, ``damp`` is multiplied by 10 (up to 6 times) and
  the retry is reported in :class:`GPTQResult`.
* Dead inputs (``H[i, i] == 0``: the channel was always 0 on the calibration
  data) get ``H[i, i] = 1``. The textbook code also zeroes their weights; we
  keep them (they are then rounded to nearest, untouched by the updates), which
  costs nothing on the calibration data and keeps the channel on other text.
* Lazy batch updates: blocks of ``block_size`` columns (default 128, rounded
  up to a multiple of the group size so a group never straddles two blocks);
  inside a block the sequential update (:func:`gptq_block_update`, the hot
  loop: C++ on the CPU) runs on a copy, the rest of W gets one GEMM per block.
* Groups: each group's (scale, zero) are computed when the group starts, from
  its columns as updated so far (standard GPTQ), with RTN's rule
  (:func:`~pyquant.algorithms.int_grid.group_params`) — so ``H = I``
  reproduces RTN exactly. ``static_groups=True`` computes all of them up front
  from the unmodified weights instead (as llm-compressor does).
  ``clip`` shrinks each group's range to minimise its quantization error:
  ``"mse"`` plain squared error, ``"hessian"`` the group's share of the output
  error ``d^T H_gg d``.
* ``fmt.act_order`` (desc_act): columns are processed (and stored) in order of
  decreasing ``diag(H)``; groups are contiguous in that order, the format
  stores the permutation.
* ``order="hessian"`` (llm-compressor's "static" act-order): columns are
  processed in order of decreasing ``diag(H)`` but stay in their groups and
  place, so the format is the plain layout (no permutation, no gather at
  inference); the group parameters are computed up front (static groups).
* ``refit``: once every code is fixed, each group's (scale, zero) is
  re-solved by least squares on the damped output error
  (:mod:`~pyquant.algorithms.group_refit`); "scale" keeps the integer zero
  points, "scale_zero" frees them (float zeros: not storable in GPTQ/AWQ
  checkpoints).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .. import _ext
from ..errors import FormatError, KernelUnavailableError, ShapeError, ValueRangeError
from ..formats import Int, QuantizedWeight
from ..ops._dtypes import ptr
from .group_refit import REFIT_MODES, refit_group_params
from .int_grid import group_params, pad_groups, search_shrink

MAX_DAMP_RETRIES = 6
CLIP_MODES = (None, "none", "mse", "hessian")


@dataclasses.dataclass
class GPTQResult:
    qweight: QuantizedWeight
    loss: float  # GPTQ's objective: sum over columns of err^2 / 2 (err scaled by U[i, i])
    damp: float  # relative damping actually used
    damp_retries: int
    dead_columns: int
    refit_rows: int = 0  # rows whose group parameters the refit changed


# --- the in-block update -----------------------------------------------------
def gptq_block_update_reference(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out):
    """Pure-torch spec of the in-block column loop.

    ``W`` (N, B) fp32 is updated in place (columns ``> i`` after column ``i``),
    ``Hinv`` (B, B) is the block of the upper Cholesky factor of ``H^-1``,
    ``scale``/``zero`` (N, n_groups) fp32 hold the parameters of the groups
    covering columns ``[start, stop)``: column ``i`` uses
    ``(i - start) // group_len``. Writes the codes (uint8) and the scaled errors
    ``(w - dq) / Hinv[i, i]`` of those columns to ``codes_out``/``err_out``
    (N, stop - start).
    """
    for i in range(start, stop):
        g = (i - start) // group_len
        s = scale[:, g]
        z = zero[:, g]
        w = W[:, i]
        q = (torch.round(w / s) + z).clamp(0, maxq)
        dq = (q - z) * s
        e = (w - dq) / Hinv[i, i]
        if i + 1 < W.shape[1]:
            W[:, i + 1 :].addr_(e, Hinv[i, i + 1 :], alpha=-1)
        codes_out[:, i - start] = q.to(torch.uint8)
        err_out[:, i - start] = e


def _cpu_ext():
    ext = _ext.load()
    return ext if ext is not None and hasattr(ext, "gptq_block_update_f32") else None


# --- the fused GPU versions (experimental until a GPU run verifies them) ---------
KERNELS = ("auto", "cpu", "reference", "triton", "cuda")
TRITON_NAME = "triton_gptq_block_update"  # names verified_kernels.json would list
CUDA_NAME = "cuda_gptq_block_update"
CUDA_MAX_BLOCK = 512  # widest block the CUDA kernel keeps in registers


def _cuda_ext():
    ext = _ext.load()
    if ext is None or not hasattr(ext, "gptq_block_update_cuda") or not ext.cuda_compiled():
        return None
    return ext


def _gpu_choice(kernel, W):
    """"triton" / "cuda" / "reference" for a GPU request, or None (the CPU paths below decide)."""
    from .hqq import _triton_usable

    dev = W.device
    if kernel == "auto":
        if dev.type != "cuda":
            return None
        from ..ops.dispatch import verified_kernels

        if CUDA_NAME in verified_kernels() and _cuda_ext() is not None and W.shape[1] <= CUDA_MAX_BLOCK:
            return "cuda"
        if TRITON_NAME in verified_kernels() and _triton_usable(dev):
            return "triton"
        return "reference"
    if kernel == "triton" and not _triton_usable(dev):
        raise KernelUnavailableError(
            f"gptq_block_update: the Triton kernel needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on "
            f"CPU); tensor on {dev}"
        )
    if kernel == "cuda":
        if dev.type != "cuda" or _cuda_ext() is None:
            raise KernelUnavailableError(
                f"gptq_block_update: the CUDA kernel needs a CUDA tensor and a CUDA build of pyquant._C "
                f"(tensor on {dev})"
            )
        if W.shape[1] > CUDA_MAX_BLOCK:
            raise KernelUnavailableError(
                f"gptq_block_update: the CUDA kernel takes blocks of at most {CUDA_MAX_BLOCK} columns, got "
                f"{W.shape[1]} (use a smaller block_size)"
            )
    return kernel if kernel in ("triton", "cuda") else None


def _check_args(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out):
    dev = W.device
    for name, t in (("W", W), ("Hinv", Hinv), ("scale", scale), ("zero", zero), ("codes_out", codes_out),
                    ("err_out", err_out)):
        if t.device != dev:
            raise ShapeError(f"gptq_block_update: {name} is on {t.device}, W on {dev}")
        if t.dim() != 2:
            raise ShapeError(f"gptq_block_update: {name} must be 2-D, got shape {tuple(t.shape)}")
        if name != "codes_out" and t.dtype != torch.float32:
            raise ShapeError(f"gptq_block_update: {name} must be fp32, got {t.dtype}")
    n, b = W.shape
    cnt = stop - start
    if not 0 <= start <= stop <= b:
        raise ShapeError(f"gptq_block_update: need 0 <= start <= stop <= {b}, got start={start}, stop={stop}")
    if group_len < 1 or not 1 <= maxq <= 255:
        raise ValueRangeError(f"gptq_block_update: group_len={group_len} must be >= 1, maxq={maxq} in [1, 255]")
    ng = math.ceil(cnt / group_len)
    if Hinv.shape[0] < stop or Hinv.shape[1] != b:
        raise ShapeError(f"gptq_block_update: Hinv {tuple(Hinv.shape)} must have {b} columns and >= {stop} rows")
    for name, t, cols in (("scale", scale, ng), ("zero", zero, ng), ("codes_out", codes_out, cnt),
                          ("err_out", err_out, cnt)):
        if t.shape[0] != n or t.shape[1] < cols:
            raise ShapeError(f"gptq_block_update: {name} {tuple(t.shape)} must be ({n}, >= {cols})")
    if codes_out.dtype != torch.uint8:
        raise ShapeError(f"gptq_block_update: codes_out must be uint8, got {codes_out.dtype}")
    if W.stride(1) != 1 or codes_out.stride(1) != 1 or err_out.stride(1) != 1:
        raise ShapeError("gptq_block_update: W, codes_out and err_out must have unit column stride")


def _update_cuda(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out):
    n, b = W.shape
    if n == 0 or stop <= start:
        return
    Hinv = Hinv.contiguous()
    scale = scale.contiguous()
    zero = zero.contiguous()
    stream = torch.cuda.current_stream(W.device).cuda_stream
    with torch.cuda.device(W.device):
        _cuda_ext().gptq_block_update_cuda(
            ptr(W), W.stride(0), n, b, ptr(Hinv), Hinv.stride(0), ptr(scale), ptr(zero), scale.stride(0),
            start, stop, group_len, maxq, ptr(codes_out), codes_out.stride(0), ptr(err_out), err_out.stride(0),
            stream,
        )


def _triton_gptq():
    """``pyquant.triton_kernels``, imported lazily (its solver imports triton at the first call)."""
    from ..ops.triton_backend import kernels

    return kernels()


def gptq_block_update(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out, kernel: str = "auto"):
    """Dispatch point of the in-block update (same contract as the reference).

    ``kernel``: "auto" (C++ on the CPU when built, else the reference; on a GPU
    the fused CUDA or Triton kernel once a GPU run lists it in
    ``pyquant/ops/verified_kernels.json``, else the reference), "cpu" (C++ or
    KernelUnavailableError), "reference", "triton" (CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1) or "cuda". Inputs must be fp32, ``W``/``Hinv``/
    ``scale``/``zero`` contiguous (the GPU kernels need only a unit column
    stride on ``W``) and ``codes_out``/``err_out`` row-major with unit column
    stride.
    """
    if kernel not in KERNELS:
        raise KernelUnavailableError(f"gptq_block_update: unknown kernel {kernel!r}")
    gpu = _gpu_choice(kernel, W)
    if gpu == "reference":
        return gptq_block_update_reference(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out)
    if gpu is not None:
        _check_args(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out)
        if gpu == "cuda":
            return _update_cuda(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out)
        return _triton_gptq().gptq_block_update(
            W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out
        )
    ext = _cpu_ext() if W.device.type == "cpu" and kernel != "reference" else None
    if kernel == "cpu" and ext is None:
        raise KernelUnavailableError("gptq_block_update: the compiled CPU kernel is not available here")
    if ext is None:
        return gptq_block_update_reference(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out)
    # The C++ loop indexes by start/stop/group_len blindly: the same bounds
    # checks as the GPU kernels, plus the full contiguity it assumes.
    _check_args(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out)
    for name, t in (("W", W), ("Hinv", Hinv), ("scale", scale), ("zero", zero)):
        if not t.is_contiguous():
            raise ShapeError(f"gptq_block_update: {name} must be contiguous fp32")
    n, b = W.shape
    ext.gptq_block_update_f32(
        ptr(W), b, n, b, ptr(Hinv), Hinv.shape[1], ptr(scale), ptr(zero), scale.shape[1],
        start, stop, group_len, maxq, ptr(codes_out), codes_out.stride(0), ptr(err_out), err_out.stride(0),
        torch.get_num_threads(),
    )


# --- the inverse Hessian -----------------------------------------------------
def _all_finite(t: torch.Tensor) -> bool:
    # One reduction instead of isfinite + all; a sum that overflows although
    # every element is finite is then confirmed element-wise.
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def triu_inverse(R: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """Inverse of an upper-triangular matrix, blocked:
    ``inv([[A, B], [0, D]]) = [[A^-1, -A^-1 B D^-1], [0, D^-1]]``.

    n^3/3 multiply-adds, nearly all in GEMMs; ``solve_triangular`` against the
    identity does n^3 (it does not know the right-hand side is triangular) and
    was 5x slower at n = 2048 on the CPU.
    """
    n = R.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=R.dtype, device=R.device)
        return torch.linalg.solve_triangular(R, eye, upper=True)
    h = n // 2
    a_inv = triu_inverse(R[:h, :h], leaf)
    d_inv = triu_inverse(R[h:, h:], leaf)
    out = torch.zeros_like(R)
    out[:h, :h] = a_inv
    out[h:, h:] = d_inv
    out[:h, h:] = -(a_inv @ R[:h, h:]) @ d_inv
    return out


def inverse_hessian_factor(H: torch.Tensor, damp: float):
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``.

    Returns ``(U, damp_used, retries)``; raises ValueRangeError when even
    ``damp * 10**6`` fails (only for non-finite H).
    """
    mean_diag = float(H.diagonal().mean())
    if not math.isfinite(mean_diag):
        raise ValueRangeError("GPTQ: the Hessian contains NaN/Inf")
    if mean_diag <= 0:
        mean_diag = 1.0
    d = damp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        Hd = H.clone()
        Hd.diagonal().add_(d * mean_diag)
        # With J the reversal permutation, chol(J H J) = L gives H = R R^T,
        # R = J L J upper; then H^-1 = R^-T R^-1, so U = R^-1 is the upper
        # Cholesky factor of H^-1: one factorisation and one triangular
        # inverse instead of the textbook's chol -> cholesky_inverse -> chol
        # (3-4x faster on the CPU, and no explicit inverse is re-factored).
        L, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
        if int(info) == 0:
            U = triu_inverse(L.flip(0, 1).contiguous()).contiguous()
            if _all_finite(U):
                return U, d, attempt
        d *= 10.0
    raise ValueRangeError(f"GPTQ: Cholesky factorisation of the Hessian failed even with damp={d / 10:g}")


# --- one layer -----------------------------------------------------------------
def _params(wg3, fmt, clip, weight, clip_grid, clip_max_shrink):
    shrink = None
    if clip not in (None, "none"):
        shrink = search_shrink(wg3, fmt, grid=clip_grid, max_shrink=clip_max_shrink, weight=weight)
    return group_params(wg3, fmt, shrink)


def _group_weight(H, c0, c1, g, clip):
    """Clip-search weights of columns [c0, c1) padded to g: None, (1, g) or (1, g, g)."""
    if clip != "hessian":
        return None
    w = torch.zeros((1, g, g), dtype=H.dtype, device=H.device)
    w[0, : c1 - c0, : c1 - c0] = H[c0:c1, c0:c1]
    return w


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    fmt: Int,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    static_groups: bool = False,
    clip: Optional[str] = None,
    clip_grid: int = 20,
    clip_max_shrink: float = 0.2,
    order: str = "natural",
    refit: Optional[str] = None,
    kernel: str = "auto",
) -> GPTQResult:
    """Quantize ``W`` (N, K) into ``fmt`` with GPTQ, given ``H`` (K, K).

    ``order``: "natural" (column order, or the format's act-order permutation)
    or "hessian" (decreasing ``diag(H)``, groups and layout unchanged; needs a
    format without act_order, implies static groups). ``refit``: None,
    "scale" or "scale_zero" (see the module docstring).

    ``H`` is ``2/n X^T X`` of the layer's calibration inputs (see
    :class:`~pyquant.algorithms.hessian.HessianAccumulator`); it may be
    singular (dead inputs, fewer tokens than K): damping makes it definite.
    """
    if not isinstance(fmt, Int):
        raise FormatError(f"GPTQ produces Int formats, got {fmt!r}")
    if W.dim() != 2 or H.dim() != 2 or H.shape[0] != H.shape[1] or H.shape[0] != W.shape[1]:
        raise ShapeError(f"GPTQ: W {tuple(W.shape)} and H {tuple(H.shape)} must be (N, K) and (K, K)")
    if clip not in CLIP_MODES:
        raise ValueError(f"GPTQ clip must be one of {CLIP_MODES}, got {clip!r}")
    if not damp > 0:
        raise ValueRangeError(f"GPTQ damp must be > 0, got {damp!r}")
    if block_size < 1:
        raise ValueRangeError(f"GPTQ block_size must be >= 1, got {block_size!r}")
    if order not in ("natural", "hessian"):
        raise ValueRangeError(f"GPTQ order must be 'natural' or 'hessian', got {order!r}")
    if refit not in REFIT_MODES:
        raise ValueRangeError(f"GPTQ refit must be one of {REFIT_MODES}, got {refit!r}")
    if order == "hessian" and fmt.act_order:
        raise FormatError("GPTQ order='hessian' keeps the plain layout: use a format without act_order")
    fmt.check_shape(tuple(W.shape))
    n, k = W.shape
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    if not _all_finite(W):
        raise ValueRangeError("GPTQ: weight contains NaN or Inf")
    if not _all_finite(H):
        raise ValueRangeError("GPTQ: the Hessian contains NaN/Inf (non-finite calibration activations?)")

    dead = H.diagonal() == 0
    n_dead = int(dead.sum())
    H.diagonal()[dead] = 1.0
    W0, H0 = (W.clone(), H) if refit else (None, None)  # the refit fits the original weights
    g = fmt.group_size_for(k)
    ng = fmt.num_groups(k)
    maxq = fmt.max_code
    codes = torch.empty((n, k), dtype=torch.uint8, device=W.device)
    scales = torch.empty((n, ng), dtype=torch.float32, device=W.device)
    zeros = torch.empty((n, ng), dtype=torch.float32, device=W.device)

    upfront = static_groups or g >= k or order == "hessian"

    def upfront_params(Wx, Hx):  # every group's (scale, zero) from Wx as it stands
        weight = None
        if clip == "hessian":
            hp = torch.zeros((ng * g, ng * g), dtype=Hx.dtype, device=Hx.device)
            hp[:k, :k] = Hx
            weight = torch.stack([hp[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(ng)])
        return _params(pad_groups(Wx, g), fmt, clip, weight, clip_grid, clip_max_shrink)

    if order == "hessian":  # the original groups, before the columns are reordered
        sz = upfront_params(W, H)
    perm = None
    if fmt.act_order or order == "hessian":
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W = W[:, perm].contiguous()
        H = H[perm][:, perm].contiguous()
    if upfront and order != "hessian":  # groups contiguous in the (act-order) processing order
        sz = upfront_params(W, H)
    if upfront:
        scales.copy_(sz[0])
        zeros.copy_(sz[1])
    U, damp_used, retries = inverse_hessian_factor(H, damp)
    bs = block_size if g >= k else math.ceil(block_size / g) * g
    # order="hessian": column j of the permuted weight keeps its original group.
    col_group = (perm // g) if order == "hessian" else None

    loss = 0.0
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        cnt = i2 - i1
        W1 = W[:, i1:i2].contiguous()
        U1 = U[i1:i2, i1:i2].contiguous()
        Q1 = torch.empty((n, cnt), dtype=torch.uint8, device=W.device)
        E1 = torch.empty((n, cnt), dtype=torch.float32, device=W.device)
        if col_group is not None:  # one (scale, zero) per column: groups are scattered in this order
            gi = col_group[i1:i2]
            gptq_block_update(W1, U1, scales[:, gi].contiguous(), zeros[:, gi].contiguous(), 0, cnt, 1, maxq,
                              Q1, E1, kernel=kernel)
        elif upfront:
            if g >= k:
                s, z, glen = scales.contiguous(), zeros.contiguous(), max(cnt, 1)
            else:
                s = scales[:, i1 // g : math.ceil(i2 / g)].contiguous()
                z = zeros[:, i1 // g : math.ceil(i2 / g)].contiguous()
                glen = g
            gptq_block_update(W1, U1, s, z, 0, cnt, glen, maxq, Q1, E1, kernel=kernel)
        else:
            for c0 in range(0, cnt, g):
                c1 = min(c0 + g, cnt)
                gi = (i1 + c0) // g
                weight = _group_weight(H, i1 + c0, i1 + c1, g, clip)
                s, z = _params(pad_groups(W1[:, c0:c1], g), fmt, clip, weight, clip_grid, clip_max_shrink)
                scales[:, gi] = s[:, 0]
                zeros[:, gi] = z[:, 0]
                gptq_block_update(W1, U1, s.contiguous(), z.contiguous(), c0, c1, g, maxq,
                                  Q1[:, c0:c1], E1[:, c0:c1], kernel=kernel)
        codes[:, i1:i2] = Q1
        loss += float((E1 * E1).sum()) / 2
        if i2 < k:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1)

    if col_group is not None:  # back to the plain layout
        codes = torch.empty_like(codes).index_copy_(1, perm, codes)
        perm = None
    refit_rows = 0
    if refit:
        if perm is not None:  # the codes' (stored) column order
            W0, H0 = W0[:, perm], H
        scales, zeros, refit_rows = refit_group_params(W0, H0, codes, scales, zeros, fmt, damp=damp_used, mode=refit)
    qw = fmt.pack(codes, scales, None if fmt.symmetric else zeros, perm=perm)
    return GPTQResult(qw, loss, damp_used, retries, n_dead, refit_rows)
