"""GPTQ on the GPU: the fused in-block update (CUDA C++, Triton) against the
unfused torch loop (``gptq_block_update_reference``, the spec), same inputs,
same process.

* one block as ``gptq_quantize`` hands it over: W (4096, 128), the block's
  inverse-Hessian factor, Int4 g128 parameters (the first block of a
  4096 x 4096 layer); Triton also at several rows-per-program;
* the whole ``gptq_quantize`` of a 4096 x 4096 layer (Int4 g128, random SPD H)
  with each kernel (Cholesky, GEMM updates and parameter search included).

The issue's target: the fused update >= 3x faster than the torch loop.
Timing: CUDA events, warm-up, median of ``--reps``; W is restored from a copy
before each update call (that copy is timed alone and subtracted).

    python benchmarks/bench_gptq_gpu.py [--quick] [--out benchmarks/results]

Exits 0 with a message when there is no CUDA device.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cuda_event_ms  # noqa: E402


def device_name() -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", torch.cuda.get_device_name()).strip("_")


def random_hessian(k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(2 * k, k, device="cuda", generator=g)
    x = x @ (torch.randn(k, k, device="cuda", generator=g) / k**0.5 + torch.eye(k, device="cuda"))
    return 2 * x.T @ x / x.shape[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (the GPU check script)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for <gpu>-gptq.json")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gptq_gpu: no CUDA device here: nothing to benchmark (run it on the GPU machine)")
        return 0

    from pyquant import _ext
    from pyquant.algorithms import gptq as G
    from pyquant.ops import gptq_block_update
    from pyquant.ops.backends import triton as triton_backend
    from pyquant.ops.primitives import group_params, pad_groups
    from pyquant.errors import KernelUnavailableError
    from pyquant.formats import Int

    reps = args.reps or (5 if args.quick else 20)
    n, k, bs = args.n, args.k, 128
    fmt = Int(4, 128)
    maxq = fmt.max_code
    torch.manual_seed(0)
    W = torch.randn(n, k, device="cuda") * 0.02
    H = random_hessian(k)
    U, _, _ = G.inverse_hessian_factor(H, 0.01)

    W0 = W[:, :bs].contiguous()
    U1 = U[:bs, :bs].contiguous()
    s, z = group_params(pad_groups(W0, 128), fmt, None)
    s, z = s.contiguous(), z.contiguous()
    work = torch.empty_like(W0)
    codes = torch.empty(n, bs, dtype=torch.uint8, device="cuda")
    err = torch.empty(n, bs, device="cuda")

    have_cuda_kernel = _ext.load() is not None and hasattr(_ext.load(), "gptq_block_update_cuda") \
        and _ext.load().cuda_compiled()
    try:
        tmod = triton_backend.kernels()
    except Exception as exc:  # triton missing: the CUDA kernel is still measured
        print(f"(triton unavailable: {exc})")
        tmod = None

    def update(kernel, **kw):
        def fn():
            work.copy_(W0)
            if kernel == "triton":
                tmod.gptq_block_update(work, U1, s, z, 0, bs, 128, maxq, codes, err, **kw)
            else:
                gptq_block_update(work, U1, s, z, 0, bs, 128, maxq, codes, err, kernel=kernel)
        return fn

    def outputs(kernel, **kw):
        update(kernel, **kw)()
        torch.cuda.synchronize()
        return work.clone(), codes.clone(), err.clone()

    copy_ms = cuda_event_ms(lambda: work.copy_(W0), reps=max(reps, 10))
    result = {"device": device_name(), "n": n, "k": k, "block": bs, "format": fmt.spec(), "reps": reps,
              "copy_ms": copy_ms, "block_update": {}, "quantize": {}}
    ref_out = outputs("reference")
    ref_ms = cuda_event_ms(update("reference"), reps) - copy_ms
    result["block_update"]["reference"] = {"ms": ref_ms}
    print(f"# GPTQ on {device_name()}: W {n}x{k}, {fmt.spec()}, block {bs}\n")
    print(f"in-block update, W ({n}, {bs}) (W restore copy {copy_ms * 1e3:.1f} us subtracted)")
    print(f"  {'kernel':<24}{'ms':>10}{'speedup':>10}{'codes ==':>12}{'max |dW|':>12}")
    print(f"  {'reference (torch loop)':<24}{ref_ms:>10.3f}{1.0:>10.2f}{'':>12}{'':>12}")

    candidates = []
    if have_cuda_kernel:
        candidates.append(("cuda", "cuda", {}))
    if tmod is not None:
        for bn in (None, 8, 16, 32, 64):
            candidates.append((f"triton block_n={bn or 'auto'}", "triton", {} if bn is None else {"block_n": bn}))
    for label, kernel, kw in candidates:
        try:
            out = outputs(kernel, **kw)
            ms = cuda_event_ms(update(kernel, **kw), reps) - copy_ms
        except (KernelUnavailableError, RuntimeError) as exc:
            print(f"  {label:<24} failed: {exc}")
            result["block_update"][label] = {"error": str(exc)}
            continue
        same = float((out[1] == ref_out[1]).float().mean())
        dw = float((out[0] - ref_out[0]).abs().max())
        result["block_update"][label] = {"ms": ms, "speedup": ref_ms / ms, "codes_equal": same, "max_abs_dW": dw}
        print(f"  {label:<24}{ms:>10.3f}{ref_ms / ms:>10.2f}{same:>12.5f}{dw:>12.2e}")

    print(f"\nwhole gptq_quantize of a {n}x{k} layer ({fmt.spec()})")
    qreps = 1 if args.quick else 3
    q_ref = None
    for kernel in ["reference"] + (["cuda"] if have_cuda_kernel else []) + (["triton"] if tmod else []):
        try:
            t0 = time.perf_counter()
            res = G.gptq_quantize(W, H, fmt, kernel=kernel)
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            ms = cuda_event_ms(lambda: G.gptq_quantize(W, H, fmt, kernel=kernel), qreps, warmup=0)
        except (KernelUnavailableError, RuntimeError) as exc:
            print(f"  {kernel:<10} failed: {exc}")
            result["quantize"][kernel] = {"error": str(exc)}
            continue
        entry = {"ms": ms, "first_call_s": first_s, "loss": res.loss}
        if kernel == "reference":
            q_ref = (ms, res.loss)
        else:
            entry["speedup"] = q_ref[0] / ms
            entry["loss_rel_diff"] = abs(res.loss - q_ref[1]) / q_ref[1]
        result["quantize"][kernel] = entry
        extra = "" if kernel == "reference" else \
            f"  speedup {entry['speedup']:.2f}x  loss rel. diff {entry['loss_rel_diff']:.1e}"
        print(f"  {kernel:<10}{ms:>10.1f} ms  loss {res.loss:.6g}{extra}")

    best = [v["speedup"] for key, v in result["block_update"].items() if key != "reference" and "speedup" in v]
    if best:
        print(f"\nbest fused block update: {max(best):.1f}x the torch loop (target >= 3x)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{device_name()}-gptq.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
