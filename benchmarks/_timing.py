"""Timing helpers shared by the benchmark scripts (not a benchmark itself).

GPU kernel time (``GraphTimer``): the way kernel authors time kernels. One call
per weight copy is captured in a CUDA graph, rotating over enough copies that
their total exceeds 4x the L2 cache (every call reads its weight from HBM, as a
layer of a real forward pass does, and no flush leaves dirty lines behind), the
batch repeated so a replay lasts a few milliseconds; the graph is replayed >= 50
times between CUDA events and the per-call time of each replay is a sample:
median, p10 and p90. Host work is not in the graph, so host time cannot leak
into kernel time. The device side is one small class (``CudaGraphDevice``) so
that everything else (rotation counts, batch sizes, statistics) is tested on the
CPU with a fake device. Eager latency (``eager_host_us``): the wall time of one
public call while the GPU is kept busy, i.e. the host cost on its own.

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

import dataclasses
import math
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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


# --- GPU: CUDA-graph timing -------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Stats:
    """Median and 10th / 90th percentiles of samples (in the samples' unit)."""

    median: float
    p10: float
    p90: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        xs = sorted(samples)
        if not xs:
            raise ValueError("no samples")

        def pct(q):  # linear interpolation between the closest ranks
            pos = q * (len(xs) - 1)
            lo = math.floor(pos)
            hi = min(lo + 1, len(xs) - 1)
            return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

        return cls(pct(0.5), pct(0.1), pct(0.9), len(xs))

    def scaled(self, factor: float) -> "Stats":
        return Stats(self.median * factor, self.p10 * factor, self.p90 * factor, self.n)


L2_FACTOR = 4.0  # rotate over weight copies totalling more than this many L2 caches


def rotation_copies(weight_bytes: int, l2_bytes: int, factor: float = L2_FACTOR) -> int:
    """Copies of a weight whose total exceeds ``factor`` x L2 (at least 2): a call then
    finds none of its weight's lines in L2, the other copies having evicted them."""
    return max(2, math.floor(factor * l2_bytes / max(1, weight_bytes)) + 1)


def batch_repeats(copies: int, est_call_ms: float, target_ms: float = 2.0, max_calls: int = 2048) -> int:
    """How often to repeat the rotation inside one graph so that a replay lasts about
    ``target_ms`` (event timing resolves ~1 us; a short replay would measure it)."""
    per_rotation = max(copies * est_call_ms, 1e-6)
    want = max(1, math.ceil(target_ms / per_rotation))
    return max(1, min(want, max_calls // max(copies, 1)))


class CudaGraphDevice:
    """The CUDA side of GraphTimer: eager runs, capture, timed replays, a busy GPU."""

    def __init__(self, device=None):
        import torch

        self.torch = torch
        self.device = torch.device(device or "cuda")

    def l2_bytes(self) -> int:
        return int(self.torch.cuda.get_device_properties(self.device).L2_cache_size)

    def run(self, fns) -> float:
        """Runs ``fns`` eagerly once; milliseconds between events around them (an
        upper bound of their kernel time: host gaps included)."""
        cuda = self.torch.cuda
        a, b = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        a.record()
        for f in fns:
            f()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)

    def capture(self, fns):
        cuda = self.torch.cuda
        cuda.synchronize()
        graph = cuda.CUDAGraph()
        stream = cuda.Stream()
        stream.wait_stream(cuda.current_stream())
        with cuda.stream(stream), cuda.graph(graph):
            for f in fns:
                f()
        cuda.current_stream().wait_stream(stream)
        cuda.synchronize()
        return graph

    def replay_ms(self, graph) -> float:
        cuda = self.torch.cuda
        a, b = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)

    def busy(self, ms: float):
        """Keeps the GPU busy for about ``ms``; returns an event recorded after it."""
        cuda = self.torch.cuda
        cuda._sleep(int(ms * 1e-3 * 2e9))  # cycles at ~2 GHz: "about" is all that matters
        ev = cuda.Event()
        ev.record()
        return ev

    def still_busy(self, event) -> bool:
        return not event.query()

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()


class GraphTimer:
    """Per-call kernel time from CUDA-graph replays (module doc)."""

    def __init__(self, device, replays: int = 50, warmup: int = 3, target_ms: float = 2.0):
        if replays < 50:
            raise ValueError(f"replays must be >= 50 for stable percentiles, got {replays}")
        self.device, self.replays, self.warmup, self.target_ms = device, replays, warmup, target_ms

    def time_calls(self, calls: Sequence[Callable[[], object]]) -> Stats:
        """``calls``: one call per weight copy. Returns per-call milliseconds."""
        calls = list(calls)
        est = self.device.run(calls) / len(calls)  # first use: plans, compiles, tables (outside capture)
        est = min(est, self.device.run(calls) / len(calls))
        body = calls * batch_repeats(len(calls), est, self.target_ms)
        graph = self.device.capture(body)
        for _ in range(self.warmup):
            self.device.replay_ms(graph)
        samples = [self.device.replay_ms(graph) / len(body) for _ in range(self.replays)]
        return Stats.of(samples)


class CudaTimer:
    """What a GPU benchmark asks of its timer: operand copies for a size, per-call
    kernel time of one call per copy (CUDA graphs), the eager host cost of one call
    with the GPU kept busy (NaN where the GPU went idle: it would include waits)."""

    def __init__(self, device=None, replays: int = 50, graph_device=None):
        self.gpu = graph_device or CudaGraphDevice(device)
        self.graphs = GraphTimer(self.gpu, replays=replays)
        self.l2 = self.gpu.l2_bytes()

    def copies(self, nbytes: int) -> int:
        return rotation_copies(nbytes, self.l2)

    def kernel(self, calls: Sequence[Callable[[], object]]) -> Stats:
        """Per-call milliseconds; ``calls`` one per operand copy."""
        return self.graphs.time_calls(calls)

    def eager_us(self, fn) -> float:
        us, busy = eager_host_us(self.gpu, fn)
        return us if busy else float("nan")


def eager_host_us(device, fn: Callable[[], object], calls: int = 100, busy_ms: float = 50.0) -> Tuple[float, bool]:
    """Wall microseconds per call of ``fn`` while the GPU is busy with earlier work
    (the calls only enqueue: what is measured is their host cost) and whether the
    GPU was still busy when the last call returned (else the figure includes waits)."""
    fn()
    device.synchronize()
    ev = device.busy(busy_ms)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = time.perf_counter() - t0
    busy = device.still_busy(ev)
    device.synchronize()
    return dt / calls * 1e6, busy


def gpu_info(index: int = 0) -> Dict[str, object]:
    """Name, clocks (current and max, MHz), power limit and driver from nvidia-smi,
    where it runs; torch / CUDA / triton versions."""
    import torch

    info: Dict[str, object] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(index)
        info.update(name=props.name, sms=props.multi_processor_count, l2_bytes=int(props.L2_cache_size),
                    memory_bytes=int(props.total_memory), capability=f"{props.major}.{props.minor}")
    info.update(nvidia_smi(index))
    return info


SMI_FIELDS = ("clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "power.limit", "driver_version",
              "temperature.gpu")


def nvidia_smi(index: int = 0, run=subprocess.run) -> Dict[str, str]:
    """The ``SMI_FIELDS`` of GPU ``index`` as nvidia-smi prints them ({} where it does not run)."""
    try:
        r = run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader", f"--id={index}"],
                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    if r.returncode or not r.stdout.strip():
        return {}
    values = [v.strip() for v in r.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(SMI_FIELDS, values)) if len(values) == len(SMI_FIELDS) else {}
