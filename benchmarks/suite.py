"""pyquant benchmark suite: qmatmul and dequantize on LLM layer shapes.

Every figure is a ratio against a baseline timed in the same process:

* qmatmul: torch's dense ``F.linear`` in the activation dtype (fp16 on CUDA,
  fp32 on the CPU) on the same shape; every pyquant backend that is available
  for the format and M (forced with ``kernel=``: cuda, triton, cpu; the
  reference only with ``--with-reference`` or on the CPU), and the peers
  where installed: torch's tinygemm ``_weight_int4pack_mm`` (CUDA, bf16
  activations: it has no fp16 path) and bitsandbytes' NF4 ``matmul_4bit``.
* dequantize: achieved GB/s (packed bytes read + output written) against a
  device-to-device copy measured in the same run.

Shapes: Llama-3-8B / 70B linear layers (out x in) 4096x4096, 14336x4096,
4096x14336, 28672x8192, and SmolLM2-135M's 1536x576, 576x1536, 576x576,
192x576; M in 1, 2, 4, 8, 16, 32, 64, 128, 512, 2048. Formats: Int4 g128 asym,
Int8 per-channel sym, NF4 (block 64), GGUF Q4_K (only where K % 256 == 0).

Timing: CUDA events around each call, an L2 flush (a 256 MB write) between
calls, warm-up, median (triton.testing.do_bench's method); the CPU uses
time.perf_counter medians. Triton runs on the CPU only under TRITON_INTERPRET=1.

Output: a markdown table on stdout, ``<out>/<device-name>.json`` and, with
matplotlib, ``<out>/<device-name>.png`` (speedup vs M per shape).

    python benchmarks/suite.py --quick --device cpu
    python benchmarks/suite.py --device cuda --out benchmarks/results
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

import pyquant  # noqa: E402
from pyquant.errors import KernelUnavailableError  # noqa: E402
from pyquant.formats import GGUF, NF4, Int, QuantizedWeight  # noqa: E402
from pyquant.ops.dispatch import select_kernel  # noqa: E402

LLAMA = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
SMOLLM2 = [(1536, 576), (576, 1536), (576, 576), (192, 576)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
FORMATS = {
    "int4_g128_asym": Int(4, 128, False, torch.float16),
    "int8_pc_sym": Int(8, -1, True, torch.float16),
    "nf4_b64": NF4(64),
    "q4_k": GGUF("Q4_K"),
}


# --- timing -------------------------------------------------------------------
class Timer:
    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.quick = quick
        self.flush = None
        if device.type == "cuda":
            self.flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)

    def __call__(self, fn) -> float:
        """Median milliseconds of ``fn()``."""
        if self.device.type == "cuda":
            return self._cuda(fn)
        return self._cpu(fn)

    def _cuda(self, fn) -> float:
        fn()
        torch.cuda.synchronize()
        # estimate, then size the run to ~100 ms (25 ms quick), 5..200 reps
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(3):
            fn()
        e.record()
        torch.cuda.synchronize()
        est = max(s.elapsed_time(e) / 3, 1e-3)
        budget = 25.0 if self.quick else 100.0
        reps = int(min(200, max(5, budget / est)))
        for _ in range(min(reps, 10)):  # warm-up
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self.flush.zero_()  # cold L2, as a layer in a real forward pass sees it
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends))

    def _cpu(self, fn) -> float:
        fn()
        budget = 0.2 if self.quick else 1.0
        times = []
        t_end = time.perf_counter() + budget
        while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3


# --- weights ------------------------------------------------------------------
def make_weight(fmt, shape, device, gen) -> QuantizedWeight:
    """A packed weight of ``fmt``: RTN of a random matrix for Int, random valid
    packed data for NF4/GGUF (speed does not depend on the values)."""
    n, k = shape
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
    peers = []
    if fmt_name == "int4_g128_asym" and device.type == "cuda" and shape[1] % 128 == 0:
        try:
            p = Tinygemm(shape, device)
            p(torch.randn(1, shape[1], device=device))
            peers.append(p)
        except Exception as exc:  # op missing or shape unsupported in this torch
            print(f"# tinygemm unavailable for {shape}: {exc.__class__.__name__}: {str(exc)[:100]}", file=sys.stderr)
    if fmt_name == "nf4_b64":
        try:
            p = BnbNF4(shape, device, dtype)
            p(torch.randn(1, shape[1], device=device, dtype=dtype))
            peers.append(p)
        except Exception as exc:
            print(f"# bitsandbytes NF4 unavailable: {exc.__class__.__name__}: {str(exc)[:100]}", file=sys.stderr)
    return peers


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


def run(args) -> dict:
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
    formats = {k: v for k, v in FORMATS.items() if not args.formats or k in args.formats.split(",")}
    backends = backends_for(device, args.with_reference)
    timer = Timer(device, args.quick)
    gen = torch.Generator().manual_seed(0)
    matmul_rows, dequant_rows = [], []

    # copy bandwidth: a buffer the size of the largest fp16/fp32 weight output
    biggest = max(n * k for n, k in shapes)
    src = torch.empty(biggest, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() * src.element_size() / copy_ms / 1e6
    del src, dst
    print(f"# {device_name(device)}: device copy {copy_gbps:.1f} GB/s; activations {dtype}; backends {backends}",
          file=sys.stderr)

    for shape in shapes:
        n, k = shape
        w_dense = (torch.randn(n, k, generator=gen) * 0.02).to(device=device, dtype=dtype)
        for fname, fmt in formats.items():
            try:
                fmt.check_shape(shape)
            except Exception:
                continue  # e.g. Q4_K needs K % 256 == 0
            qw = make_weight(fmt, shape, device, gen)
            # dequantize bandwidth
            for b in backends:
                kname = kernel_name("dequantize", fmt, device, n, b)
                if kname is None:
                    continue
                try:
                    t = timer(lambda: pyquant.dequantize(qw, dtype, kernel=b))
                except Exception as exc:
                    dequant_rows.append(dict(n=n, k=k, format=fname, backend=b, kernel=kname, error=repr(exc)[:200]))
                    continue
                moved = qw.nbytes + n * k * torch.empty((), dtype=dtype).element_size()
                gbps = moved / t / 1e6
                dequant_rows.append(dict(n=n, k=k, format=fname, backend=b, kernel=kname, ms=t, gbps=gbps,
                                         copy_fraction=gbps / copy_gbps))
            peers = make_peers(fname, shape, device, dtype)
            for m in ms:
                x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
                dense_ms = timer(lambda: F.linear(x, w_dense))
                flops = 2.0 * m * n * k
                wbytes = qw.nbytes  # packed weight read once: the memory-bound floor at small M

                def add(backend, kname, fn):
                    try:
                        t = timer(fn)
                    except Exception as exc:
                        matmul_rows.append(dict(n=n, k=k, m=m, format=fname, backend=backend, kernel=kname,
                                                error=repr(exc)[:200]))
                        return
                    matmul_rows.append(dict(n=n, k=k, m=m, format=fname, backend=backend, kernel=kname, ms=t,
                                            dense_ms=dense_ms, speedup=dense_ms / t, tflops=flops / t / 1e9,
                                            weight_gbps=wbytes / t / 1e6))

                for b in backends:
                    kname = kernel_name("qmatmul", fmt, device, m, b)
                    if kname is not None:
                        add(b, kname, lambda b=b: pyquant.qmatmul(x, qw, kernel=b))
                for p in peers:
                    add(p.name, p.name, lambda p=p: p(x))
            del qw, peers
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del w_dense

    return {
        "device": device_name(device),
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": pyquant.env()["triton"],
        "pyquant": pyquant.__version__,
        "activation_dtype": str(dtype).replace("torch.", ""),
        "quick": args.quick,
        "copy_gbps": copy_gbps,
        "matmul": matmul_rows,
        "dequantize": dequant_rows,
    }


def markdown(result: dict) -> str:
    lines = [f"## {result['device']} (torch {result['torch']}, triton {result['triton']}, "
             f"{result['activation_dtype']} activations)", "",
             "### qmatmul vs dense F.linear (speedup > 1: faster than dense)", "",
             "| N x K | M | format | backend | kernel | ms | dense ms | speedup | TFLOP/s | weight GB/s |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result["matmul"]:
        if "error" in r:
            lines.append(f"| {r['n']}x{r['k']} | {r['m']} | {r['format']} | {r['backend']} | {r['kernel']} | "
                         f"error: {r['error'][:60]} | | | | |")
        else:
            lines.append(f"| {r['n']}x{r['k']} | {r['m']} | {r['format']} | {r['backend']} | {r['kernel']} | "
                         f"{r['ms']:.4f} | {r['dense_ms']:.4f} | {r['speedup']:.2f} | {r['tflops']:.2f} | "
                         f"{r['weight_gbps']:.1f} |")
    lines += ["", f"### dequantize bandwidth (device copy: {result['copy_gbps']:.1f} GB/s)", "",
              "| N x K | format | backend | kernel | ms | GB/s | of copy |", "|---|---|---|---|---:|---:|---:|"]
    for r in result["dequantize"]:
        if "error" in r:
            lines.append(f"| {r['n']}x{r['k']} | {r['format']} | {r['backend']} | {r['kernel']} | "
                         f"error: {r['error'][:60]} | | |")
        else:
            lines.append(f"| {r['n']}x{r['k']} | {r['format']} | {r['backend']} | {r['kernel']} | {r['ms']:.4f} | "
                         f"{r['gbps']:.1f} | {100 * r['copy_fraction']:.0f}% |")
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
