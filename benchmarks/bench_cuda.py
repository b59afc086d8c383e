"""Benchmarks of pyquant's CUDA C++ kernels, each next to its baseline timed in
the same process (DESIGN.md, Benchmarks).

* cuda_int4_gemv (Int4 g128 asym, fp16 x, M = 1..8): time, achieved GB/s
  (packed weight + scales + zeros + x + y) and its fraction of a device-to-device
  copy measured in this run; speedup over torch's dense fp16 F.linear.
* the W8A8 kernels (Int8 per-channel, fp16 x, incl. activation quantization):
  cuda_int8_w8a8_matmul_sm90 (CUTLASS, Hopper) where it runs and
  cuda_int8_w8a8_matmul (mma.sync): TOPS and speedup over dense fp16 F.linear and
  over torch._int_mm on pre-quantized int8 operands (the int8 GEMM alone, where
  available).
* dequantize kernels registered for CUDA (cuda_*_dequantize): GB/s vs copy.

Timing (``_timing.CudaTimer``): CUDA graphs of calls rotating over operand copies
totalling more than 4x the L2 cache (every call reads its weight from HBM, no
flush), replayed >= 50 times: median and p10/p90 per call. The baselines are
timed the same way in the same process. ``eager us``: the host cost of one
public call while the GPU is kept busy.

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
from _timing import CudaTimer, gpu_info  # noqa: E402

import pyquant  # noqa: E402
from pyquant.formats import GGUF, NF4, Int, QuantizedWeight  # noqa: E402
from pyquant.ops import w8a8_matmul  # noqa: E402
from pyquant.ops.dispatch import kernel_by_name, select_kernel  # noqa: E402

# (out, in): Llama-3-8B q/o, gate/up, down; Llama-3-70B up-like
GEMV_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
GEMM_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
GEMV_MS = [1, 2, 4, 8]
GEMM_MS = [16, 128, 512, 2048]
# every W8A8 kernel that takes the call on this GPU, timed in the same process
W8A8_KERNELS = ("cuda_int8_w8a8_matmul_sm90", "cuda_int8_w8a8_matmul")


def device_name() -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", torch.cuda.get_device_name()).strip("_")


def _nbytes(qw) -> int:
    return sum(t.numel() * t.element_size() for t in qw.tensors.values())


def _copies(timer, t) -> list:
    """``t`` (a tensor or QuantizedWeight) and clones, as many as the rotation needs."""
    if isinstance(t, QuantizedWeight):
        n = timer.copies(_nbytes(t))
        return [t] + [QuantizedWeight(t.format, {k: v.clone() for k, v in t.tensors.items()}, t.shape)
                      for _ in range(n - 1)]
    return [t] + [t.clone() for _ in range(timer.copies(t.numel() * t.element_size()) - 1)]


def _time(timer, fn, operands):
    """Per-call microseconds (Stats) of ``fn(operand)`` over the operand copies."""
    return timer.kernel([lambda o=o: fn(o) for o in operands]).scaled(1e3)


def copy_gbps(timer) -> float:
    srcs = _copies(timer, torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda"))
    dst = torch.empty_like(srcs[0])
    st = _time(timer, lambda s: dst.copy_(s), srcs)
    return 2 * srcs[0].numel() / st.median / 1e3  # read + write


def _weight(n, k, fmt):
    # RTN on the GPU (the codes do not matter for timing); the CPU if that fails.
    w = torch.randn(n, k, device="cuda") * 0.02
    try:
        return pyquant.quantize_weight(w, fmt)
    except Exception:
        return pyquant.quantize_weight(w.cpu(), fmt).to("cuda")


def _stats(st, prefix=""):
    return {f"{prefix}us": st.median, f"{prefix}p10_us": st.p10, f"{prefix}p90_us": st.p90}


def bench_gemv(timer, copy_bw, shapes, ms):
    rows = []
    fmt = Int(4, 128, False, torch.float16)
    for n, k in shapes:
        qws = _copies(timer, _weight(n, k, fmt))
        wds = _copies(timer, torch.randn(n, k, device="cuda", dtype=torch.float16))
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t_q = _time(timer, lambda q: pyquant.qmatmul(x, q, kernel="cuda"), qws)
            t_d = _time(timer, lambda w: F.linear(x, w), wds)
            nbytes = _nbytes(qws[0]) + 2 * m * (k + n)
            gbps = nbytes / t_q.median / 1e3
            rows.append({
                "kernel": "cuda_int4_qmatmul_gemv", "shape": f"{n}x{k}", "m": m, **_stats(t_q), **_stats(t_d, "dense_"),
                "speedup_vs_dense": t_d.median / t_q.median, "gbps": gbps, "copy_fraction": gbps / copy_bw,
                "eager_us": timer.eager_us(lambda: pyquant.qmatmul(x, qws[0], kernel="cuda")),
            })
        del qws, wds
    return rows


def bench_w8a8(timer, shapes, ms):
    rows = []
    fmt = Int(8, -1, True, torch.float16)
    has_int_mm = hasattr(torch, "_int_mm")
    for n, k in shapes:
        qws = _copies(timer, _weight(n, k, fmt))
        wds = _copies(timer, torch.randn(n, k, device="cuda", dtype=torch.float16))
        # (K, N) column-major, as cuBLASLt wants
        wi8s = [w.t() for w in _copies(timer, torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8))]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t_d = _time(timer, lambda w: F.linear(x, w), wds)
            t_i = None
            if has_int_mm:
                xi8 = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
                try:
                    t_i = _time(timer, lambda w: torch._int_mm(xi8, w), wi8s)
                except RuntimeError as exc:  # shape constraints of _int_mm
                    t_i = str(exc).splitlines()[0]
            for name in W8A8_KERNELS:
                kern = kernel_by_name(name)
                if kern is None or not kern.supports(fmt, x.device, m):
                    continue  # e.g. the sm_90a kernel on another GPU
                t_q = _time(timer, lambda q: w8a8_matmul(x, q, kernel=name), qws)
                row = {"kernel": name, "shape": f"{n}x{k}", "m": m, **_stats(t_q), **_stats(t_d, "dense_"),
                       "speedup_vs_dense": t_d.median / t_q.median, "tops": 2 * m * n * k / t_q.median / 1e6}
                if isinstance(t_i, str):
                    row["int_mm_error"] = t_i
                elif t_i is not None:
                    row["int_mm_us"] = t_i.median
                    row["speedup_vs_int_mm"] = t_i.median / t_q.median
                rows.append(row)
        del qws, wds, wi8s
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
            qws = _copies(timer, pyquant.quantize_weight(torch.randn(n, k) * 0.02, fmt).to("cuda"))
        except Exception as exc:  # a format without a quantizer here
            rows.append({"kernel": kern.name, "format": fmt.spec(), "error": str(exc).splitlines()[0]})
            continue
        t = _time(timer, lambda q: pyquant.dequantize(q, torch.float16, kernel="cuda"), qws)
        gbps = (_nbytes(qws[0]) + 2 * n * k) / t.median / 1e3
        rows.append({"kernel": kern.name, "format": fmt.spec(), "shape": f"{n}x{k}", **_stats(t), "gbps": gbps,
                     "copy_fraction": gbps / copy_bw})
    return rows


def _us(r, prefix=""):
    return f"{r[prefix + 'us']:.1f} | {r[prefix + 'p10_us']:.1f}-{r[prefix + 'p90_us']:.1f}"


def markdown(result) -> str:
    out = [f"## CUDA kernels on {result['device']} (copy {result['copy_gbps']:.0f} GB/s; CUDA graphs over "
           "weight copies > 4x L2, median and p10-p90 per call)", ""]
    if result["gemv"]:
        out += ["### cuda_int4_qmatmul_gemv (int4 g128 asym, fp16)", "",
                "| shape | M | us | p10-p90 | dense us | dense p10-p90 | speedup | GB/s | of copy | eager us |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["gemv"]:
            out.append(f"| {r['shape']} | {r['m']} | {_us(r)} | {_us(r, 'dense_')} | {r['speedup_vs_dense']:.2f}x | "
                       f"{r['gbps']:.0f} | {r['copy_fraction']:.0%} | {r['eager_us']:.1f} |")
        out.append("")
    if result["w8a8"]:
        out += ["### W8A8 (int8 per-channel, fp16, incl. activation quantization)", "",
                "| kernel | shape | M | us | p10-p90 | dense us | dense p10-p90 | speedup | TOPS | vs _int_mm |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["w8a8"]:
            vs = f"{r['speedup_vs_int_mm']:.2f}x" if "speedup_vs_int_mm" in r else "-"
            out.append(f"| {r['kernel']} | {r['shape']} | {r['m']} | {_us(r)} | {_us(r, 'dense_')} | "
                       f"{r['speedup_vs_dense']:.2f}x | {r['tops']:.0f} | {vs} |")
        out.append("")
    if result["dequant"]:
        out += ["### dequantize to fp16 (4096x4096)", "", "| kernel | format | us | p10-p90 | GB/s | of copy |",
                "|---|---|---|---|---|---|"]
        for r in result["dequant"]:
            if "error" in r:
                out.append(f"| {r['kernel']} | {r['format']} | - | - | - | {r['error']} |")
            else:
                out.append(f"| {r['kernel']} | {r['format']} | {_us(r)} | {r['gbps']:.0f} | {r['copy_fraction']:.0%} |")
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
    axes[0].set(title="cuda_int4_qmatmul_gemv vs dense fp16", xlabel="M", ylabel="speedup", xscale="log", xticks=GEMV_MS)
    axes[0].set_xticklabels([str(m) for m in GEMV_MS])
    for kernel, shape in sorted({(r["kernel"], r["shape"]) for r in result["w8a8"]}):
        rs = [r for r in result["w8a8"] if r["shape"] == shape and r["kernel"] == kernel]
        axes[1].plot([r["m"] for r in rs], [r["speedup_vs_dense"] for r in rs], marker="o",
                     label=f"{kernel.replace('cuda_int8_w8a8_matmul', 'w8a8')} {shape}")
    axes[1].set(title="W8A8 vs dense fp16", xlabel="M", ylabel="speedup", xscale="log")
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
    ap.add_argument("--replays", type=int, default=50, help="CUDA-graph replays per candidate (>= 50)")
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
    timer = CudaTimer("cuda", replays=args.replays)
    copy_bw = copy_gbps(timer)
    gemv_shapes = GEMV_SHAPES[:2] if args.quick else GEMV_SHAPES
    gemm_shapes = GEMM_SHAPES[:2] if args.quick else GEMM_SHAPES
    result = {"device": device_name(), "gpu": gpu_info(), "cuda_arches": list(ext.cuda_arches()),
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
