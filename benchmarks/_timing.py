"""Timing helpers shared by the CPU benchmark scripts (not a benchmark itself).

The benchmark machine is shared, and its load changes by the second, so a
candidate is always timed in the same process as its baseline and, where the
script allows it, interleaved with it (each repetition runs every candidate
once). The best repetition is the figure a script reports: on a shared
machine the slower samples measure the neighbours' load, not the code.

Scripts import it as ``from _timing import ...``: run as
``python benchmarks/<file>.py`` (or collected by pytest from ``benchmarks/``),
this folder is on ``sys.path``.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch


def interleaved(fns: Sequence[Callable[[], object]], repeat: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> List[Tuple[float, float]]:
    """``[(best, median)]`` seconds of each callable, timed alternately.

    Every callable first runs ``warmup`` times (first-call costs: allocator,
    lazy extension load). ``clock`` is ``time.perf_counter`` (wall) or a CPU
    clock (``time.thread_time`` / ``time.process_time``), which leaves out time
    spent waiting for a core.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = clock()
            fn()
            times[i].append(clock() - t0)
    return [(min(t), statistics.median(t)) for t in times]


def timed(fn: Callable[[], object], repeats: int) -> Tuple[object, float, List[float]]:
    """``(last result, median seconds, every time)`` of ``repeats`` back-to-back
    wall-clock runs of ``fn`` (no warm-up: for runs long enough that the
    first-call costs do not matter, or where the caller warms up)."""
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), times


def copy_bandwidth(nbytes: int, repeat: int, warmup: int = 1,
                   clock: Callable[[], float] = time.perf_counter) -> float:
    """GB/s of torch's fp32 copy of ``nbytes`` (read + write counted), the
    memory-bandwidth yardstick the kernels' GB/s are compared with."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    ((best, _),) = interleaved([lambda: dst.copy_(src)], repeat, warmup=warmup, clock=clock)
    return 2 * nbytes / best / 1e9


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Tuple[float, float, float]:
    """The 1, 5 and 15-minute load averages (how busy the shared machine was
    around a run); NaNs where the OS does not report them."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return (float("nan"),) * 3


def cuda_event_ms(fn: Callable[[], object], reps: int, warmup: int = 2,
                  before: Optional[Callable[[], object]] = None) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream, timed with
    CUDA events; ``before()`` (e.g. an L2 flush) runs untimed before each rep."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)
