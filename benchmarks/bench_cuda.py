"""Benchmarks of pyquant's CUDA C++ kernels, each next to its baseline timed in
the same process (DESIGN.md, Benchmarks).

* cuda_int4_gemv (Int4 g128 asym, fp16 x, M = 1..8): time, achieved GB/s
  (packed weight + scales + zeros + x + y) and its fraction of a device-to-device
  copy measured in this run; speedup over torch's dense fp16 F.linear.
* cuda_w8a8_gemm (Int8 per-channel, fp16 x, incl. activation quantization):
  TOPS and speedup over dense fp16 F.linear and over torch._int_mm on
  pre-quantized int8 operands (the int8 GEMM alone, where available).
* dequantize kernels registered for CUDA (cuda_*_dequantize): GB/s vs copy.

Timing: CUDA events around each call, an L2 flush (256 MB write) before every
call so the weights come from HBM, warm-up, median of ``--reps``.

    python benchmarks/bench_cuda.py --out build/gpu_check/bench   # JSON, markdown, PNG
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cuda_event_ms  # noqa: E402

import pyquant  # noqa: E402
from pyquant.formats import GGUF, NF4, Int  # noqa: E402
from pyquant.ops import w8a8_matmul  # noqa: E402
from pyquant.ops.dispatch import select_kernel  # noqa: E402

# (out, in): Llama-3-8B q/o, gate/up, down; Llama-3-70B up-like
GEMV_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
GEMM_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
GEMV_MS = [1, 2, 4, 8]
GEMM_MS = [16, 128, 512, 2048]


def device_name() -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", torch.cuda.get_device_name()).strip("_")


class Timer:
    def __init__(self, reps: int):
        self.reps = reps
        self.flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")

    def __call__(self, fn) -> float:
        """Median milliseconds of fn() with a cold L2."""
        return cuda_event_ms(fn, self.reps, warmup=3, before=self.flush.zero_)


def copy_gbps(timer: Timer) -> float:
    src = torch.empty(512 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6  # read + write


def _nbytes(qw) -> int:
    return sum(t.numel() * t.element_size() for t in qw.tensors.values())


def _weight(n, k, fmt):
    # RTN on the GPU (the codes do not matter for timing); the CPU if that fails.
    w = torch.randn(n, k, device="cuda") * 0.02
    try:
        return pyquant.quantize_weight(w, fmt)
    except Exception:
        return pyquant.quantize_weight(w.cpu(), fmt).to("cuda")


def bench_gemv(timer, copy_bw, shapes, ms):
    rows = []
    fmt = Int(4, 128, False, torch.float16)
    for n, k in shapes:
        qw = _weight(n, k, fmt)
        wd = torch.randn(n, k, device="cuda", dtype=torch.float16)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t_q = timer(lambda: pyquant.qmatmul(x, qw, kernel="cuda"))
            t_d = timer(lambda: F.linear(x, wd))
            nbytes = _nbytes(qw) + 2 * m * (k + n)
            gbps = nbytes / t_q / 1e6
            rows.append({
                "kernel": "cuda_int4_gemv", "shape": f"{n}x{k}", "m": m, "ms": t_q, "dense_ms": t_d,
                "speedup_vs_dense": t_d / t_q, "gbps": gbps, "copy_fraction": gbps / copy_bw,
            })
        del qw, wd
    return rows


def bench_w8a8(timer, shapes, ms):
    rows = []
    fmt = Int(8, -1, True, torch.float16)
    has_int_mm = hasattr(torch, "_int_mm")
    for n, k in shapes:
        qw = _weight(n, k, fmt)
        wd = torch.randn(n, k, device="cuda", dtype=torch.float16)
        wi8 = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8).t()  # (K, N) column-major, as cuBLASLt wants
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t_q = timer(lambda: w8a8_matmul(x, qw, kernel="cuda"))
            t_d = timer(lambda: F.linear(x, wd))
            row = {"kernel": "cuda_w8a8_gemm", "shape": f"{n}x{k}", "m": m, "ms": t_q, "dense_ms": t_d,
                   "speedup_vs_dense": t_d / t_q, "tops": 2 * m * n * k / t_q / 1e9}
            if has_int_mm:
                xi8 = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
                try:
                    t_i = timer(lambda: torch._int_mm(xi8, wi8))
                    row["int_mm_ms"] = t_i
                    row["speedup_vs_int_mm"] = t_i / t_q
                except RuntimeError as exc:  # shape constraints of _int_mm
                    row["int_mm_error"] = str(exc).splitlines()[0]
            rows.append(row)
        del qw, wd, wi8
    return rows


def bench_dequant(timer, copy_bw):
    rows = []
    n, k = 4096, 4096
    candidates = [Int(4, 128, False), Int(8, -1, True), NF4(64), NF4(64, True)] + [
        GGUF(t) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q8_0")
    ]
    for fmt in candidates:
        try:
            kern = select_kernel("dequantize", fmt, torch.device("cuda"), n, "cuda")
        except pyquant.KernelUnavailableError:
            continue
        try:
            qw = pyquant.quantize_weight(torch.randn(n, k) * 0.02, fmt).to("cuda")
        except Exception as exc:  # a format without a quantizer here
            rows.append({"kernel": kern.name, "format": fmt.spec(), "error": str(exc).splitlines()[0]})
            continue
        t = timer(lambda: pyquant.dequantize(qw, torch.float16, kernel="cuda"))
        gbps = (_nbytes(qw) + 2 * n * k) / t / 1e6
        rows.append({"kernel": kern.name, "format": fmt.spec(), "shape": f"{n}x{k}", "ms": t, "gbps": gbps,
                     "copy_fraction": gbps / copy_bw})
    return rows


def markdown(result) -> str:
    out = [f"## CUDA kernels on {result['device']} (copy {result['copy_gbps']:.0f} GB/s)", ""]
    if result["gemv"]:
        out += ["### cuda_int4_gemv (int4 g128 asym, fp16)", "",
                "| shape | M | us | dense us | speedup | GB/s | of copy |", "|---|---|---|---|---|---|---|"]
        for r in result["gemv"]:
            out.append(f"| {r['shape']} | {r['m']} | {r['ms'] * 1e3:.1f} | {r['dense_ms'] * 1e3:.1f} | "
                       f"{r['speedup_vs_dense']:.2f}x | {r['gbps']:.0f} | {r['copy_fraction']:.0%} |")
        out.append("")
    if result["w8a8"]:
        out += ["### cuda_w8a8_gemm (int8 per-channel, fp16, incl. activation quantization)", "",
                "| shape | M | us | dense us | speedup | TOPS | vs _int_mm |", "|---|---|---|---|---|---|---|"]
        for r in result["w8a8"]:
            vs = f"{r['speedup_vs_int_mm']:.2f}x" if "speedup_vs_int_mm" in r else "-"
            out.append(f"| {r['shape']} | {r['m']} | {r['ms'] * 1e3:.1f} | {r['dense_ms'] * 1e3:.1f} | "
                       f"{r['speedup_vs_dense']:.2f}x | {r['tops']:.0f} | {vs} |")
        out.append("")
    if result["dequant"]:
        out += ["### dequantize to fp16 (4096x4096)", "", "| kernel | format | us | GB/s | of copy |",
                "|---|---|---|---|---|"]
        for r in result["dequant"]:
            if "error" in r:
                out.append(f"| {r['kernel']} | {r['format']} | - | - | {r['error']} |")
            else:
                out.append(f"| {r['kernel']} | {r['format']} | {r['ms'] * 1e3:.1f} | {r['gbps']:.0f} | "
                           f"{r['copy_fraction']:.0%} |")
        out.append("")
    return "\n".join(out)


def plot(result, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for shape in sorted({r["shape"] for r in result["gemv"]}):
        rs = [r for r in result["gemv"] if r["shape"] == shape]
        axes[0].plot([r["m"] for r in rs], [r["speedup_vs_dense"] for r in rs], marker="o", label=shape)
    axes[0].set(title="cuda_int4_gemv vs dense fp16", xlabel="M", ylabel="speedup", xscale="log", xticks=GEMV_MS)
    axes[0].set_xticklabels([str(m) for m in GEMV_MS])
    for shape in sorted({r["shape"] for r in result["w8a8"]}):
        rs = [r for r in result["w8a8"] if r["shape"] == shape]
        axes[1].plot([r["m"] for r in rs], [r["speedup_vs_dense"] for r in rs], marker="o", label=shape)
    axes[1].set(title="cuda_w8a8_gemm vs dense fp16", xlabel="M", ylabel="speedup", xscale="log")
    for ax in axes:
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.legend(fontsize=7)
    fig.suptitle(result["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="two shapes per kernel")
    ap.add_argument("--skip", default="", help="comma list of gemv,w8a8,dequant to skip")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device", file=sys.stderr)
        return 2
    from pyquant import _ext

    ext = _ext.load()
    if ext is None or not ext.cuda_compiled():
        print("bench_cuda: pyquant._C has no CUDA kernels (build with PYQUANT_CUDA=ON)", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    timer = Timer(args.reps)
    copy_bw = copy_gbps(timer)
    gemv_shapes = GEMV_SHAPES[:2] if args.quick else GEMV_SHAPES
    gemm_shapes = GEMM_SHAPES[:2] if args.quick else GEMM_SHAPES
    result = {"device": device_name(), "torch": torch.__version__, "cuda_arches": list(ext.cuda_arches()),
              "copy_gbps": copy_bw, "gemv": [], "w8a8": [], "dequant": []}
    for key, fn in (("gemv", lambda: bench_gemv(timer, copy_bw, gemv_shapes, GEMV_MS)),
                    ("w8a8", lambda: bench_w8a8(timer, gemm_shapes, GEMM_MS)),
                    ("dequant", lambda: bench_dequant(timer, copy_bw))):
        if key in skip:
            continue
        try:
            result[key] = fn()
        except Exception as exc:  # one broken kernel must not hide the others' numbers
            result[f"{key}_error"] = f"{type(exc).__name__}: {exc}"
            print(f"bench_cuda: {key} failed: {exc}", file=sys.stderr)
    md = markdown(result)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cuda.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "bench_cuda.md").write_text(md + "\n")
    plot(result, out / "bench_cuda.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
