"""Host microseconds per eager call of every qmatmul path, on the CPU, launches stubbed.

    python benchmarks/host_overhead.py                  # SmolLM2's 576x576 layer, M = 1, 4, 16
    python benchmarks/host_overhead.py --shape 4096x4096 --m 1,16,128 --json out.json

What a GPU call costs before its kernel starts is Python: validation, kernel
choice, argument preparation, the launch call. This runs that Python for real on
CPU tensors with only the last step replaced (benchmarks/_host_stubs.py): the
extension's entry points (CPU C++ and CUDA launches) record and return, the CUDA
backend's stream and device calls return constants, and Triton runs through a
stand-in driver (sm_90 kernels really compile, with the bundled ptxas; the
launcher records and returns). The reference backend's kernel function is
replaced by one returning a ready tensor, so its row is dispatch overhead only.

Per path (cpu, cuda, triton, reference) and M it prints the steps of the eager
call, each timed on its own (best and median of interleaved repetitions of 300-call
loops, in this thread's CPU time unless ``--wall``):

* ``checks``: the public function's argument checks and the eager/graph decision;
* ``plan lookup``: the plan cache's validity check and lookup;
* ``plan run``: the plan (output allocation, bound arguments, the stubbed launch);
* ``pyquant.qmatmul`` and ``QuantLinear.forward``: the whole call;
* ``torch.ops.pyquant.qmatmul``: the op-layer path (dispatcher + autograd wrapper)
  that compile, tracing and autograd take, for comparison.

Needs the kernels compiled, not interpreted: run it without TRITON_INTERPRET. The
machine is shared: the figures are only comparable within one run (same process,
interleaved); the header records the CPU model and load.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _host_stubs as stubs  # noqa: E402
from _timing import cpu_name, interleaved, load_average  # noqa: E402

import pyquant  # noqa: E402
from pyquant.errors import KernelUnavailableError  # noqa: E402
from pyquant.formats import Int  # noqa: E402
from pyquant.ops import api, dispatch, plans  # noqa: E402

PATHS = ("cpu", "cuda", "triton", "reference")
LOOPS = 300


@contextlib.contextmanager
def reference_kernel_stubbed(out_shape):
    """The reference qmatmul returns a ready tensor: what is left is dispatch."""
    ready = torch.zeros(out_shape)
    key = ("qmatmul", "reference")
    saved = dispatch._REGISTRY[key]
    dispatch._REGISTRY[key] = [dataclasses.replace(k, fn=lambda x, q, f, s, b: ready) for k in saved]
    try:
        yield
    finally:
        dispatch._REGISTRY[key] = saved




@contextlib.contextmanager
def backend_on_cpu(path: str, n: int, m: int):
    with contextlib.ExitStack() as st:
        if path in ("cpu", "cuda"):
            st.enter_context(stubs.stub_extension())
        if path == "cuda":
            st.enter_context(stubs.cuda_backend_on_cpu())
        if path == "triton":
            st.enter_context(stubs.triton_on_cpu())
        if path == "reference":
            st.enter_context(reference_kernel_stubbed((m, n)))
        yield


def steps(path: str, n: int, k: int, m: int, x_dtype: torch.dtype):
    """{step name: callable running it once} for one path and M."""
    torch.manual_seed(0)
    fmt = Int(4, 128, False, torch.float16)
    qw = pyquant.quantize_weight(torch.randn(n, k), fmt)
    lin = pyquant.QuantLinear(qw, kernel=path)
    x = torch.randn(m, k).to(x_dtype)
    qdata = qw.tensor_list()
    spec = fmt.spec()
    pyquant.qmatmul(x, qw, kernel=path)  # builds the plan (Triton: compiles)
    lin(x)
    cache = api.plan_cache(qw)
    plan = cache.plans[(plans.m_bucket(m), x.dtype, path)]
    key = (plans.m_bucket(m), x.dtype, path)

    def lookup():
        cache.valid_for(qdata)
        return cache.plans.get(key)

    return {
        "checks": lambda: (api.check_matmul_inputs(x, n, k, qdata[0].device, None),
                           api._op_layer_is_idle((x, None, *qdata))),
        "plan lookup": lookup,
        "plan run": lambda: plan(x, None),
        "pyquant.qmatmul": lambda: pyquant.qmatmul(x, qw, kernel=path),
        "QuantLinear.forward": lambda: lin(x),
        "torch.ops.pyquant.qmatmul": lambda: torch.ops.pyquant.qmatmul(x, qdata, spec, n, k, None, path),
    }


def loop(fn, loops=LOOPS):
    def run():
        for _ in range(loops):
            fn()

    return run


def measure(paths, shape, ms, repeat: int, clock=time.thread_time):
    n, k = shape
    rows = []
    for path in paths:
        for m in ms:
            x_dtype = torch.float32 if path in ("cpu", "reference") else torch.float16
            with torch.no_grad(), backend_on_cpu(path, n, m):
                try:
                    named = steps(path, n, k, m, x_dtype)
                except KernelUnavailableError:  # e.g. the CUDA GEMV above M = 8
                    rows.append(dict(path=path, m=m, step="-", error="no kernel of this backend at this M"))
                    continue
                except Exception as exc:  # e.g. Triton without its NVIDIA backend
                    rows.append(dict(path=path, m=m, step="-", error=f"{type(exc).__name__}: {exc}"))
                    continue
                times = interleaved([loop(f) for f in named.values()], repeat, warmup=1, clock=clock)
            for (step, _), (best, median) in zip(named.items(), times):
                rows.append(dict(path=path, m=m, step=step, best_us=best / LOOPS * 1e6,
                                 median_us=median / LOOPS * 1e6))
    return rows


def markdown(result) -> str:
    lines = [f"## Host microseconds per eager call, launches stubbed ({result['shape']}, Int4 g128)", "",
             f"CPU: {result['cpu']}; load average {result['load'][0]:.2f}; torch {result['torch']}; "
             f"threads {result['threads']}; clock: {result['clock']}. Comparable only within this run.", "",
             "| path | M | step | best us | median us |", "|---|---:|---|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['path']} | {r['m']} | unavailable: {r['error'][:80]} | | |")
        else:
            lines.append(f"| {r['path']} | {r['m']} | {r['step']} | {r['best_us']:.2f} | {r['median_us']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="576x576", help="N x K of the weight")
    ap.add_argument("--m", default="1,4,16", help="comma-separated M values")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--wall", action="store_true", help="wall-clock time (default: this thread's CPU time, which "
                    "leaves out the time a loaded machine makes the thread wait for a core)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        print("host_overhead: unset TRITON_INTERPRET (the Triton path needs compiled kernels)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    result = {"shape": args.shape, "cpu": cpu_name(), "load": list(load_average()), "torch": torch.__version__,
              "threads": torch.get_num_threads(),
              "clock": "wall" if args.wall else "thread CPU time",
              "rows": measure(args.paths.split(","), shape, [int(v) for v in args.m.split(",")], args.repeat,
                              time.perf_counter if args.wall else time.thread_time)}
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
