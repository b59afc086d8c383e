"""Launch plans: the eager ``qmatmul`` of one weight with its host work done once.

A plan is ``run(x2d, bias) -> y`` for one weight, activation dtype, ``kernel=``
and M bucket (0, 1, 2, 4, 8, ... rows): the kernel is selected, the packed tensors
checked and their pointers, sizes and launch configuration computed when the plan
is built; a call then allocates the output and launches. A plan with the
attribute ``takes_nd`` also takes x of any leading dims, contiguous, and returns
y of the same leading dims (no reshape of x and y around it: a transformer's 3-D
x). Kernels that register a ``plan`` factory (``dispatch.register_kernel``) do
their own; every other kernel gets a plan that calls its function.

Plans live in a :class:`PlanCache` per weight (on the ``QuantizedWeight`` object
for ``pyquant.qmatmul``, on the module for ``QuantLinear``). A cache is only
trusted for the very tensors it was built from: each call compares the packed
tensors by identity and data pointer, so a weight whose tensors are replaced,
moved to another device (``module.to``) or re-pointed (``t.data = ...``) gets new
plans, never a stale one. A plan holds references to the tensors whose pointers
it keeps, so those pointers stay valid while it lives.

Nothing a plan does per call breaks CUDA-graph capture: no host sync, outputs
allocated per call (the graph's pool fixes their addresses), the current stream
read at each launch.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import KernelUnavailableError
from .dispatch import select_kernel

Plan = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


class PlanCache:
    """The launch plans of one weight, valid while its packed tensors are the same."""

    __slots__ = ("tensors", "ptrs", "device", "plans", "layout")

    def __init__(self):
        self.tensors: Tuple[torch.Tensor, ...] = ()
        self.ptrs: Tuple[int, ...] = ()
        self.device: Optional[torch.device] = None
        self.plans: Dict[tuple, Plan] = {}
        self.layout = (None, None, ())  # (format, shape, packed tensor names) of a QuantizedWeight

    def names(self, fmt, shape) -> Tuple[str, ...]:
        """The packed tensor names of ``fmt`` at ``shape`` in canonical order (computed
        once: ``Format.tensor_specs`` builds a dict each call)."""
        f, s, names = self.layout
        if f is not fmt or s != shape:
            names = tuple(fmt.tensor_specs(shape))
            self.layout = (fmt, shape, names)
        return names

    # a copied or pickled module starts with no plans (they hold pointers and compiled kernels)
    def __deepcopy__(self, memo):
        return PlanCache()

    def __reduce__(self):
        return (PlanCache, ())

    def valid_for(self, qdata) -> bool:
        if len(qdata) != len(self.tensors):
            return False
        for q, t, p in zip(qdata, self.tensors, self.ptrs):
            if q is not t or q.data_ptr() != p:
                return False
        return True

    def reset(self, qdata) -> None:
        # plans first: a thread in ``planned`` meanwhile that sees the new tensors
        # then sees no plan of the old ones
        self.plans = {}
        self.tensors = tuple(qdata)
        self.ptrs = tuple(q.data_ptr() for q in qdata)
        self.device = qdata[0].device if qdata else None

    def planned(self, x: torch.Tensor, qdata, kernel: str) -> Optional[Plan]:
        """The plan an earlier call built for one like this, or None: ``qdata``
        still the tensors the plans were built from (identity and pointer, as
        ``valid_for``), x on their device, a plan for x's M bucket, dtype and
        ``kernel``. x's last dim must already be K. Such a plan exists only for a
        dtype and device the full checks passed, so the steady-state call needs
        none of them again (with ``api._plain_eager_call``: QuantLinear's call
        0.6-0.8 us shorter, measured at 576 x 576 on a Zen 5)."""
        tensors = self.tensors
        if len(qdata) != len(tensors) or x.device != self.device:
            return None
        for q, t, p in zip(qdata, tensors, self.ptrs):
            if q is not t or q.data_ptr() != p:
                return None
        m = x.shape[0] if x.dim() == 2 else x.numel() // x.shape[-1]
        return self.plans.get((m_bucket(m), x.dtype, kernel))


def out_like(x_shape: torch.Size, n: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized (..., n) tensor for x of shape (..., K) other than 2-D:
    the launch plans' y, sized without a view of x (3-D spelled out, ~0.2 us
    less than ``*x_shape[:-1]``). The plans allocate 2-D y inline, where this
    call's own cost would add as much."""
    if len(x_shape) == 3:
        return torch.empty(x_shape[0], x_shape[1], n, dtype=dtype)
    return torch.empty(*x_shape[:-1], n, dtype=dtype)


def m_bucket(m: int) -> int:
    """0, or the power of two at least ``m``: M values one plan serves."""
    return 0 if m <= 0 else 1 << (m - 1).bit_length()


def _generic_plan(kern, qdata, fmt, shape) -> Plan:
    fn, qlist = kern.fn, list(qdata)

    def run(x, bias):
        return fn(x, qlist, fmt, shape, bias)

    return run


def _kernel_plan(op: str, qdata, fmt, shape, device: torch.device, m: int, kernel: str):
    kern = select_kernel(op, fmt, device, m, kernel, shape=shape)
    if kern.plan is not None:
        return kern, kern.plan(qdata, fmt, shape, device, m)
    return kern, _generic_plan(kern, qdata, fmt, shape)


def _selects(op, fmt, device, m, kernel, shape, kern) -> bool:
    try:
        return select_kernel(op, fmt, device, m, kernel, shape=shape) is kern
    except KernelUnavailableError:
        return False


def build_plan(op: str, qdata, fmt, shape, device: torch.device, m: int, kernel: str) -> Plan:
    """The plan of ``op`` for M rows; serves every M of ``m_bucket(m)`` when the
    same kernel takes both ends of the bucket, else one plan per M."""
    kern, plan = _kernel_plan(op, qdata, fmt, shape, device, m, kernel)
    hi = m_bucket(m)
    lo = hi // 2 + 1 if hi > 1 else hi
    if all(_selects(op, fmt, device, e, kernel, shape, kern) for e in {lo, hi} - {m}):
        return plan
    exact = {m: plan}

    def per_m(x, bias):  # a kernel boundary inside the bucket
        rows = x.shape[0]
        p = exact.get(rows)
        if p is None:
            p = exact[rows] = _kernel_plan(op, qdata, fmt, shape, device, rows, kernel)[1]
        return p(x, bias)

    return per_m


_OP_CACHES = WeakIdKeyDictionary()


def run_op(x: torch.Tensor, qdata, fmt, shape, bias, kernel: str) -> torch.Tensor:
    """The same for ``torch.ops.pyquant.qmatmul``'s implementation (autograd, CUDA
    graph trees): the op gets a fresh tensor list each call, so its plans are kept
    per packed ``qweight`` tensor (weakly: they go with it)."""
    cache = _OP_CACHES.get(qdata[0])
    if cache is None:
        cache = _OP_CACHES[qdata[0]] = PlanCache()
    return execute(cache, x, qdata, fmt, shape, bias, kernel)


def execute(cache: PlanCache, x: torch.Tensor, qdata, fmt, shape, bias, kernel: str) -> torch.Tensor:
    """``x @ W_hat.T + bias`` through ``cache``'s plans (inputs already validated)."""
    if not cache.valid_for(qdata):
        cache.reset(qdata)
    k = shape[1]
    m = x.shape[0] if x.dim() == 2 else x.numel() // k
    key = (m_bucket(m), x.dtype, kernel)
    plan = cache.plans.get(key)
    if plan is None:
        plan = cache.plans[key] = build_plan("qmatmul", cache.tensors, fmt, shape, x.device, m, kernel)
    return launch(plan, x, bias, shape)


def launch(plan: Plan, x: torch.Tensor, bias, shape) -> torch.Tensor:
    """``plan`` on x of any leading dims (validated inputs)."""
    if not x.is_contiguous():
        x = x.contiguous()
    if x.dim() == 2 or getattr(plan, "takes_nd", False):
        return plan(x, bias)
    # (a reshape each way costs ~0.75 us: a tenth of a 576-wide product on a CPU)
    n, k = shape
    return plan(x.reshape(-1, k), bias).reshape(*x.shape[:-1], n)


# What the eager public entry points (``pyquant.qmatmul``, ``QuantLinear.forward``)
# call: ``execute`` itself (one Python frame less), under its own name.
run_qmatmul = execute
