"""GPU timing of the Triton qmatmul against dense fp16 (cuBLAS) on the target shapes.

    python -m pyquant.triton_kernels.tools.bench                 # Int4 g128 asym, M = 1, 16, 64
    python -m pyquant.triton_kernels.tools.bench --fmt int8_g128_sym_fp16 --m 1 4 --tune

For each (N, K) and M: the dense ``x @ W.T`` with fp16 W (torch.matmul, cuBLAS) and
``pyquant.triton_kernels.qmatmul`` on the same x, both timed in this process with
``triton.testing.do_bench`` (median), the speedup, and the weight bytes per second
of the quantized kernel. The weight is random packed data of the format (timing
does not depend on the values); W is its Triton ``dequantize`` (bit-exact against
the reference in tests/triton), and each quantized result is first checked
against the fp32 product with it. Needs CUDA; nothing here runs at import.
"""
from __future__ import annotations

import argparse
import sys

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192))  # (N, K): Llama-3-8B/70B layers
TARGETS = {1: 3.5, 16: 3.0, 64: 2.0}  # wanted speedup over fp16 at M (Int4 group 128)


def _weight(fmt, n, k, device):
    """Random packed tensors of ``fmt`` for an (n, k) weight."""
    import torch

    from pyquant.formats import QuantizedWeight

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (shape, dtype) in fmt.tensor_specs((n, k)).items():
        if name == "perm":
            t = torch.randperm(k, generator=g).to(dtype)
        elif dtype == torch.uint8:
            # codes, and GGUF blocks whose fp16 fields (d, dmin) sit among the codes:
            # without bit 6 of each byte, every fp16 exponent is below 16 (finite)
            t = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) & 0xBF
        else:  # scales, zeros, absmax: small positive values
            t = (torch.rand(shape, generator=g) * 0.02 + 0.001).to(dtype)
        tensors[name] = t.to(device)
    return QuantizedWeight(fmt, tensors, (n, k))


def run(fmt_spec: str, ms, shapes=SHAPES, tune: bool = False, dtype_name: str = "fp16"):
    import torch
    from triton.testing import do_bench

    from pyquant.formats import format_from_spec

    from .. import dequantize, path_for_m, qmatmul
    from .. import tune as tune_fn

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    fmt = format_from_spec(fmt_spec)
    dev = torch.device("cuda")
    rows = []
    print(f"## {torch.cuda.get_device_name(dev)}: {fmt.spec()} x {dtype_name}\n")
    print("| N x K | M | path | dense us | triton us | speedup | target | weight GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for n, k in shapes:
        qw = _weight(fmt, n, k, dev)
        qdata = qw.tensor_list()
        w16 = dequantize(qdata, fmt, qw.shape, dtype)
        wbytes = sum(t.numel() * t.element_size() for t in qdata)
        if tune:
            tune_fn(qw, m_values=ms, dtype=dtype, paths=sorted({path_for_m(m) for m in ms}))
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            y = qmatmul(x, qdata, fmt, qw.shape)
            ref = x.float() @ w16.float().T
            err = float((y.float() - ref).abs().max() / ref.abs().max())
            if not err < 1e-2:
                raise AssertionError(f"{n}x{k} M={m}: max error {err:.3g} of max |y|")
            t_dense = do_bench(lambda: torch.matmul(x, w16.T), warmup=25, rep=200, return_mode="median")
            t_q = do_bench(lambda: qmatmul(x, qdata, fmt, qw.shape), warmup=25, rep=200, return_mode="median")
            speed = t_dense / t_q
            target = TARGETS.get(m, "")
            print(f"| {n}x{k} | {m} | {path_for_m(m)} | {t_dense * 1e3:.1f} | {t_q * 1e3:.1f} | {speed:.2f}x | "
                  f"{target and f'{target}x'} | {wbytes / t_q / 1e6:.0f} |")
            rows.append(dict(n=n, k=k, m=m, dense_ms=t_dense, triton_ms=t_q, speedup=speed))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fmt", default="int4_g128_asym_fp16")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--tune", action="store_true", help="autotune each shape first (saved per GPU)")
    args = ap.parse_args(argv)
    run(args.fmt, args.m, tune=args.tune, dtype_name=args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
