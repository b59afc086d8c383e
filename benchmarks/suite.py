"""pyquant benchmark suite: qmatmul and dequantize on LLM layer shapes.

Every figure is a ratio against a baseline timed in the same process, the same way:

* qmatmul: torch's dense ``F.linear`` in the activation dtype (fp16 on CUDA: cuBLAS;
  fp32 on the CPU) on the same shape; every pyquant backend available for the
  format and M (forced with ``kernel=``: cuda, triton, cpu; the reference only with
  ``--with-reference`` or on the CPU), and the peers where installed: torch's
  tinygemm ``_weight_int4pack_mm`` (CUDA, bf16 activations: it has no fp16 path)
  and bitsandbytes' NF4 ``matmul_4bit``.
* dequantize: achieved GB/s (packed bytes read + output written) against a
  device-to-device copy measured in the same run.

GPU timing (``_timing.GraphTimer``): each candidate is captured in a CUDA graph of
calls rotating over weight copies totalling more than 4x the L2 cache (each call
reads its weight from HBM; no flush), replayed >= 50 times; rows give the median
and p10/p90 of the per-call time. ``eager us`` is apart: the wall time of one
public call (``pyquant.qmatmul``) while the GPU is kept busy, i.e. its host cost.
``--repeat-check`` times the first shape's dense baseline and first backend twice
and records how far the two runs differ. On the CPU: medians of wall-clock calls.

Shapes: Llama-3-8B / 70B linear layers (out x in) 4096x4096, 14336x4096,
4096x14336, 28672x8192, and SmolLM2-135M's 1536x576, 576x1536, 576x576,
192x576; M in 1, 2, 4, 8, 16, 32, 64, 128, 512, 2048. Formats: Int4 g128 asym,
Int8 per-channel sym, NF4 (block 64), GGUF Q4_K (only where K % 256 == 0).
Triton runs on the CPU only under TRITON_INTERPRET=1.

Output: a markdown table on stdout, ``<out>/<device-name>.json`` (with the GPU's
name, clocks, torch / CUDA / triton versions) and, with matplotlib,
``<out>/<device-name>.png`` (speedup vs M per shape).

    python benchmarks/suite.py --quick --device cpu
    python benchmarks/suite.py --device cuda --out benchmarks/results
    python benchmarks/suite.py --device cuda --formats int4_g128_asym --m 1,4,16,64,128,512,2048
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import CudaTimer, Stats, gpu_info  # noqa: E402

import pyquant  # noqa: E402
from pyquant.errors import KernelUnavailableError  # noqa: E402
from pyquant.formats import GGUF, NF4, Int, IntMMA, QuantizedWeight, to_mma  # noqa: E402
from pyquant.ops.dispatch import select_kernel  # noqa: E402

LLAMA = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
SMOLLM2 = [(1536, 576), (576, 1536), (576, 576), (192, 576)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
FORMATS = {
    "int4_g128_asym": Int(4, 128, False, torch.float16),
    # the same weight repacked for the tensor-core kernel (cuda_int4mma_qmatmul; other backends decline it)
    "int4mma_g128_asym": IntMMA(4, 128, False, torch.float16),
    "int8_pc_sym": Int(8, -1, True, torch.float16),
    "nf4_b64": NF4(64),
    "q4_k": GGUF("Q4_K"),
}


# --- timing -------------------------------------------------------------------
class CpuTimer:
    """CPU: wall-clock medians of back-to-back calls (one operand: no cache to defeat
    that a CPU benchmark could, at these sizes)."""

    def __init__(self, quick: bool):
        self.budget = 0.2 if quick else 1.0

    def copies(self, nbytes: int) -> int:
        return 1

    def kernel(self, calls) -> Stats:
        fn = calls[0]
        fn()
        times = []
        t_end = time.perf_counter() + self.budget
        while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return Stats.of(times)

    def eager_us(self, fn) -> float:
        return float("nan")  # on the CPU the call is the kernel


# --- weights ------------------------------------------------------------------
def make_weight(fmt, shape, device, gen) -> QuantizedWeight:
    """A packed weight of ``fmt``: RTN of a random matrix for Int, random valid
    packed data for NF4/GGUF (speed does not depend on the values)."""
    n, k = shape
    if isinstance(fmt, IntMMA):
        plain = Int(fmt.bits, fmt.group_size, fmt.symmetric, fmt.scale_dtype)
        return to_mma(make_weight(plain, shape, device, gen))
    if isinstance(fmt, Int):
        w = torch.randn(n, k, generator=gen).to(device) * 0.02
        return pyquant.quantize_weight(w, fmt)
    tensors = {}
    for name, (tshape, dtype) in fmt.tensor_specs(shape).items():
        if dtype == torch.uint8:
            t = torch.randint(0, 256, tshape, dtype=torch.uint8, generator=gen)
        else:
            t = torch.rand(tshape, generator=gen) * 0.02 + 0.005
        tensors[name] = t.to(dtype)
    if isinstance(fmt, GGUF):
        from pyquant.formats.gguf_blocks import FP16_FIELDS

        b = tensors["blocks"].view(-1, fmt.block.type_size)
        d = (torch.rand(b.shape[0], generator=gen) * 1e-3 + 1e-4).to(torch.float16).view(torch.int16).to(torch.int32)
        for off in FP16_FIELDS[fmt.type]:
            b[:, off] = (d & 0xFF).to(torch.uint8)
            b[:, off + 1] = ((d >> 8) & 0xFF).to(torch.uint8)
    return QuantizedWeight(fmt, tensors, shape).to(device)


# --- peers --------------------------------------------------------------------
class Tinygemm:
    """torch's int4 tinygemm (``_weight_int4pack_mm``), group 128, bf16 activations."""

    name = "torch-tinygemm"

    def __init__(self, shape, device):
        n, k = shape
        q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
        self.packed = torch._convert_weight_to_int4pack(q, 8)
        self.sz = torch.rand(k // 128, n, 2, device=device).to(torch.bfloat16)

    def __call__(self, x):
        return torch._weight_int4pack_mm(x.to(torch.bfloat16) if x.dtype != torch.bfloat16 else x, self.packed, 128, self.sz)


class BnbNF4:
    name = "bitsandbytes-nf4"

    def __init__(self, shape, device, dtype):
        import bitsandbytes as bnb
        import bitsandbytes.functional as bF

        self.bnb = bnb
        w = torch.randn(*shape, device=device, dtype=dtype) * 0.02
        self.q, self.state = bF.quantize_4bit(w, blocksize=64, quant_type="nf4")

    def __call__(self, x):
        return self.bnb.matmul_4bit(x, self.q.t(), quant_state=self.state)


def make_peers(fmt_name, shape, device, dtype):
    """[(name, factory)] of the peer libraries for this format: ``factory()`` builds
    one instance (one weight copy) whose ``__call__(x)`` is the peer's matmul."""
    peers = []
    if fmt_name == "int4_g128_asym" and device.type == "cuda" and shape[1] % 128 == 0:
        peers.append((Tinygemm.name, lambda: Tinygemm(shape, device)))
    if fmt_name == "nf4_b64":
        peers.append((BnbNF4.name, lambda: BnbNF4(shape, device, dtype)))
    out = []
    for name, factory in peers:
        try:
            factory()(torch.randn(1, shape[1], device=device, dtype=dtype))
            out.append((name, factory))
        except Exception as exc:  # op missing, package missing, shape unsupported
            print(f"# {name} unavailable for {shape}: {exc.__class__.__name__}: {str(exc)[:100]}", file=sys.stderr)
    return out


def weight_copies(qw: QuantizedWeight, count: int) -> List[QuantizedWeight]:
    """``qw`` and ``count - 1`` copies in their own memory (and their own launch plans)."""
    return [qw] + [QuantizedWeight(qw.format, {k: v.clone() for k, v in qw.tensors.items()}, qw.shape)
                   for _ in range(count - 1)]


# --- the suite ----------------------------------------------------------------
def backends_for(device: torch.device, with_reference: bool):
    if device.type == "cuda":
        out = ["cuda", "triton"]
    else:
        out = ["cpu"]
        if os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes"):
            out.append("triton")
    if with_reference or device.type == "cpu":
        out.append("reference")
    return out


def kernel_name(op, fmt, device, m, backend):
    try:
        return select_kernel(op, fmt, device, m, backend).name
    except KernelUnavailableError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"cpu-{name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def run(args, timer=None) -> dict:
    """The suite on ``args.device``; ``timer`` (a CudaTimer or CpuTimer by default)
    is what the tests replace."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.quick:
        shapes = ([(4096, 4096), (14336, 4096)] if device.type == "cuda" else []) + SMOLLM2[:2]
        ms = [1, 16, 128, 2048] if device.type == "cuda" else [1, 16, 128]
    else:
        shapes = LLAMA + SMOLLM2
        ms = MS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    if args.m:
        ms = [int(v) for v in args.m.split(",")]
    if args.formats:
        formats = {k: v for k, v in FORMATS.items() if k in args.formats.split(",")}
    else:  # the mma layout has a CUDA kernel only: elsewhere it would time the reference
        formats = {k: v for k, v in FORMATS.items() if device.type == "cuda" or not isinstance(v, IntMMA)}
    backends = backends_for(device, args.with_reference)
    if timer is None:
        timer = CudaTimer(device, args.replays) if device.type == "cuda" else CpuTimer(args.quick)
    gen = torch.Generator().manual_seed(0)
    matmul_rows, dequant_rows = [], []
    esize = torch.empty((), dtype=dtype).element_size()

    # copy bandwidth: a buffer the size of the largest fp16/fp32 weight output
    biggest = max(n * k for n, k in shapes)
    srcs = [torch.empty(biggest, dtype=dtype, device=device).normal_() for _ in range(timer.copies(biggest * esize))]
    dst = torch.empty_like(srcs[0])
    copy_ms = timer.kernel([lambda s=s: dst.copy_(s) for s in srcs]).median
    copy_gbps = 2 * biggest * esize / copy_ms / 1e6
    del srcs, dst
    print(f"# {device_name(device)}: device copy {copy_gbps:.1f} GB/s; activations {dtype}; backends {backends}",
          file=sys.stderr)

    def timed(fn_per_copy, operands):
        """(Stats in us, error) of one candidate over its operand copies."""
        try:
            return timer.kernel([lambda o=o: fn_per_copy(o) for o in operands]).scaled(1e3), None
        except Exception as exc:  # one broken kernel must not hide the others' numbers
            return None, repr(exc)[:200]

    for shape in shapes:
        n, k = shape
        w_dense = (torch.randn(n, k, generator=gen) * 0.02).to(device=device, dtype=dtype)
        dense_copies = [w_dense] + [w_dense.clone() for _ in range(timer.copies(n * k * esize) - 1)]
        for fname, fmt in formats.items():
            try:
                fmt.check_shape(shape)
            except Exception:
                continue  # e.g. Q4_K needs K % 256 == 0
            qw = make_weight(fmt, shape, device, gen)
            copies = weight_copies(qw, timer.copies(qw.nbytes))
            for b in backends:  # dequantize bandwidth
                kname = kernel_name("dequantize", fmt, device, n, b)
                if kname is None:
                    continue
                st, err = timed(lambda q, b=b: pyquant.dequantize(q, dtype, kernel=b), copies)
                row = dict(n=n, k=k, format=fname, backend=b, kernel=kname)
                if err:
                    dequant_rows.append(dict(row, error=err))
                    continue
                gbps = (qw.nbytes + n * k * esize) / st.median / 1e3
                dequant_rows.append(dict(row, us=st.median, p10_us=st.p10, p90_us=st.p90, gbps=gbps,
                                         copy_fraction=gbps / copy_gbps))
            peers = [(name, [factory() for _ in copies]) for name, factory in make_peers(fname, shape, device, dtype)]
            for m in ms:
                x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
                dense, err = timed(lambda w: F.linear(x, w), dense_copies)
                if err:
                    matmul_rows.append(dict(n=n, k=k, m=m, format=fname, backend="dense", kernel="F.linear",
                                            error=err))
                    continue

                def add(backend, kname, fn, operands, eager=None):
                    st, err = timed(fn, operands)
                    row = dict(n=n, k=k, m=m, format=fname, backend=backend, kernel=kname)
                    if err:
                        matmul_rows.append(dict(row, error=err))
                        return
                    matmul_rows.append(dict(
                        row, us=st.median, p10_us=st.p10, p90_us=st.p90, dense_us=dense.median,
                        dense_p10_us=dense.p10, dense_p90_us=dense.p90, speedup=dense.median / st.median,
                        tflops=2.0 * m * n * k / st.median / 1e6, weight_gbps=qw.nbytes / st.median / 1e3,
                        eager_us=timer.eager_us(eager) if eager is not None else float("nan")))

                for b in backends:
                    kname = kernel_name("qmatmul", fmt, device, m, b)
                    if kname is not None:
                        add(b, kname, lambda q, b=b: pyquant.qmatmul(x, q, kernel=b), copies,
                            eager=lambda b=b: pyquant.qmatmul(x, qw, kernel=b))
                for name, instances in peers:
                    add(name, name, lambda p: p(x), instances)
            del qw, copies, peers
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del w_dense, dense_copies

    result = {
        "device": device_name(device),
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": pyquant.env()["triton"],
        "pyquant": pyquant.__version__,
        "timing": ("CUDA graphs over weight copies > 4x L2, per-call median and p10/p90 of "
                   f"{getattr(timer, 'graphs', None) and timer.graphs.replays} replays")
        if device.type == "cuda" else "wall-clock medians",
        "gpu": gpu_info() if device.type == "cuda" else None,
        "activation_dtype": str(dtype).replace("torch.", ""),
        "quick": args.quick,
        "copy_gbps": copy_gbps,
        "matmul": matmul_rows,
        "dequantize": dequant_rows,
    }
    if args.repeat_check and matmul_rows:
        result["repeat_check"] = repeat_check(args, timer, device, dtype, shapes[0], ms[0], formats, backends)
    return result


def repeat_check(args, timer, device, dtype, shape, m, formats, backends) -> dict:
    """Times the dense baseline and the first pyquant backend of one shape twice
    more; the relative spread of the medians says how far two runs agree."""
    n, k = shape
    fmt = next(iter(formats.values()))
    gen = torch.Generator().manual_seed(1)
    qw = make_weight(fmt, shape, device, gen)
    copies = weight_copies(qw, timer.copies(qw.nbytes))
    w = (torch.randn(n, k, generator=gen) * 0.02).to(device=device, dtype=dtype)
    dense_copies = [w] + [w.clone() for _ in range(timer.copies(w.numel() * w.element_size()) - 1)]
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    backend = next((b for b in backends if kernel_name("qmatmul", fmt, device, m, b)), None)
    out = {"shape": f"{n}x{k}", "m": m, "backend": backend}
    for name, calls in (("dense", [lambda w=w: F.linear(x, w) for w in dense_copies]),
                        (backend, [lambda q=q: pyquant.qmatmul(x, q, kernel=backend) for q in copies])):
        if name is None:
            continue
        a, b = timer.kernel(calls).median, timer.kernel(calls).median
        out[name] = {"run1_us": a * 1e3, "run2_us": b * 1e3, "rel_diff": abs(a - b) / min(a, b)}
    return out


def _us(v) -> str:
    return "-" if v is None or v != v else f"{v:.1f}"


def markdown(result: dict) -> str:
    gpu = result.get("gpu") or {}
    clocks = ", ".join(f"{k} {gpu[k]}" for k in ("clocks.sm", "clocks.max.sm", "clocks.mem") if gpu.get(k))
    lines = [f"## {result['device']} (torch {result['torch']}, triton {result['triton']}"
             f"{', CUDA ' + str(gpu['cuda']) if gpu.get('cuda') else ''}, {result['activation_dtype']} activations)",
             "", f"Timing: {result.get('timing', '-')}.{' Clocks: ' + clocks + '.' if clocks else ''}", "",
             "### qmatmul vs dense F.linear (speedup > 1: faster than dense)", "",
             "| N x K | M | format | backend | kernel | us | p10-p90 us | dense us | speedup | TFLOP/s | "
             "weight GB/s | eager us |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["matmul"]:
        head = f"| {r['n']}x{r['k']} | {r['m']} | {r['format']} | {r['backend']} | {r['kernel']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:60]} | | | | | | |")
        else:
            lines.append(f"{head} {_us(r['us'])} | {_us(r['p10_us'])}-{_us(r['p90_us'])} | {_us(r['dense_us'])} | "
                         f"{r['speedup']:.2f} | {r['tflops']:.2f} | {r['weight_gbps']:.0f} | {_us(r['eager_us'])} |")
    lines += ["", f"### dequantize bandwidth (device copy: {result['copy_gbps']:.1f} GB/s)", "",
              "| N x K | format | backend | kernel | us | p10-p90 us | GB/s | of copy |",
              "|---|---|---|---|---:|---:|---:|---:|"]
    for r in result["dequantize"]:
        head = f"| {r['n']}x{r['k']} | {r['format']} | {r['backend']} | {r['kernel']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:60]} | | | |")
        else:
            lines.append(f"{head} {_us(r['us'])} | {_us(r['p10_us'])}-{_us(r['p90_us'])} | {r['gbps']:.1f} | "
                         f"{100 * r['copy_fraction']:.0f}% |")
    rc = result.get("repeat_check")
    if rc:
        lines += ["", f"### two runs of {rc['shape']} M={rc['m']}", ""]
        for name in ("dense", rc.get("backend")):
            if name in rc:
                v = rc[name]
                lines.append(f"- {name}: {v['run1_us']:.1f} us and {v['run2_us']:.1f} us "
                             f"({100 * v['rel_diff']:.1f}% apart)")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: skipping the plot", file=sys.stderr)
        return False
    rows = [r for r in result["matmul"] if "error" not in r]
    shapes = sorted({(r["n"], r["k"]) for r in rows}, key=lambda s: -s[0] * s[1])
    if not shapes:
        return False
    cols = min(4, len(shapes))
    nrows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, (n, k) in zip(axes.flat, shapes):
        series = {}
        for r in rows:
            if (r["n"], r["k"]) == (n, k):
                series.setdefault(f"{r['format']}/{r['backend']}", []).append((r["m"], r["speedup"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{n}x{k}", fontsize=9)
        ax.set_xlabel("M")
        ax.set_ylabel("speedup vs dense")
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)
    fig.suptitle(f"{result['device']}: qmatmul speedup vs dense {result['activation_dtype']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and M values (a few minutes)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON and PNG")
    ap.add_argument("--shapes", help="override shapes, e.g. 4096x4096,1536x576 (out x in)")
    ap.add_argument("--m", help="override M values, e.g. 1,16,128")
    ap.add_argument("--formats", help=f"subset of {','.join(FORMATS)}")
    ap.add_argument("--with-reference", action="store_true", help="also time the pure-torch reference on CUDA")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--replays", type=int, default=50, help="CUDA-graph replays per candidate (>= 50)")
    ap.add_argument("--repeat-check", action="store_true",
                    help="time the first shape's baseline and first backend twice more (run-to-run agreement)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(markdown(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{result['device']}.json"
    json_path.write_text(json.dumps(result, indent=1))
    print(f"\n# wrote {json_path}", file=sys.stderr)
    png = out / f"{result['device']}.png"
    if plot(result, png):
        print(f"# wrote {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
