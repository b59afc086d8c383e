"""Offline report of every CUDA and Triton matmul/dequantize kernel: what its sm_90a
machine code says and what that predicts on the benchmark shapes. No GPU needed.

    python -m pyquant.triton_kernels.tools.report            # markdown tables
    python -m pyquant.triton_kernels.tools.report --json F   # also the rows as JSON
    python -m pyquant.triton_kernels.tools.report --only cuda_int4

It lives beside ``sass.py`` (the SASS parser, Triton's sm_90 pipeline and bundled
ptxas/cuobjdump) so that CUDA C++ kernels (``cuda_build.py``: nvcc -cubin of each
``csrc/cuda`` file) and Triton kernels are read by one parser and judged by one GPU
model (``gpu_model.py``, H100 SXM figures). Kernel names are the registry's
(``pyquant.ops.dispatch``); the tests check that each one here is registered.

Table 1, per kernel variant (its shipped configuration, Int4 g128 asymmetric with
fp16 scales and activations for the matmuls): registers, spilled bytes, shared
memory, threads per CTA, resident CTAs per SM and what limits them, occupancy,
the main loop (the backward branch with the longest body; the whole kernel for the
dequantize kernels, where each thread handles one tile), its instructions per
weight (loop instructions / weights one thread handles per iteration; a static
count: both sides of a branch count) and its memory instructions by kind and access
width in bits.

Table 2, per variant, benchmark shape (N x K) and M: CTAs launched, waves,
bytes moved (packed weight + activations + output + split-K workspace), the
bandwidth-bound time (bytes / HBM bandwidth), the issue-bound time of the main
loop over all weights it visits (once per M tile), and which of the two binds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Callable, Dict, List, Optional, Tuple

from . import cuda_build, gpu_model
from . import sass as S

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192))  # Llama-3-8B / 70B layers (N, K)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def int4_g128_bytes(n: int, k: int) -> int:
    """Packed Int4 g128 asymmetric weight: nibbles in 32-code chunks + fp16 scales and zeros."""
    return n * cdiv(k, 32) * 16 + 2 * n * cdiv(k, 128) * 2


def act_bytes(n: int, k: int, m: int, elem: int = 2) -> int:
    return elem * m * (k + n)


@dataclasses.dataclass
class Variant:
    kernel: str  # registry name
    label: str
    ms: Tuple[int, ...]  # the M values this build serves in the benchmark
    threads: int
    weights_per_iter: float  # weights one thread handles per main-loop iteration (or per kernel)
    grid: Callable[[int, int, int], int]  # CTAs launched for (N, K, M)
    nbytes: Callable[[int, int, int], int]  # bytes moved for (N, K, M)
    visits: Callable[[int, int, int], int]  # weights the main loop handles for (N, K, M), every M tile
    build: Callable[[], Tuple[list, Dict[str, int]]]  # -> (instructions, resource usage)
    whole_kernel: bool = False  # one tile per thread: the whole kernel is the "loop" (its loops are helpers)
    marker: Optional[str] = None  # the main loop is the one holding most of these opcodes (HMMA: the MMA loop)
    dynamic_smem: int = 0  # shared memory the launch asks for (not in the cubin's static figure)
    # wgmma kernels: ops (2 x multiply-adds, tiles padded) the tensor cores run for (N, K, M), of
    # tensor_kind ("int8" or "fp16"). Their main loop issues one asynchronous GMMA per 64 x N x k16/k32
    # block, so the time bound is the tensor cores' throughput, not instruction issue; the report then
    # shows no instructions per weight.
    tensor_ops: Optional[Callable[[int, int, int], float]] = None
    tensor_kind: str = "int8"


@dataclasses.dataclass
class KernelRow:
    kernel: str
    label: str
    threads: int
    stats: S.SassStats
    occ: gpu_model.Occupancy

    def as_dict(self) -> dict:
        st = self.stats
        return {"kernel": self.kernel, "variant": self.label, "regs": st.regs, "spill_bytes": st.local,
                "smem": st.smem, "threads": self.threads, "ctas_per_sm": self.occ.ctas_per_sm,
                "occupancy": self.occ.fraction, "occupancy_limit": self.occ.limit, "loop_instructions": st.loop,
                "weights_per_iter": st.weights_per_iter, "instr_per_weight": st.per_weight,
                "loop_mem": st.loop_mem, "mem_widths": S.mem_widths(st.loop_mem)}


# --- CUDA C++ kernels -------------------------------------------------------------
class _CudaFile:
    """One compiled ``csrc/cuda`` file: functions by readable name, resources by mangled name."""

    _cache: Dict[Tuple[str, Tuple[str, ...]], "_CudaFile"] = {}

    def __init__(self, stem: str, defines: Tuple[str, ...] = ()):
        path = cuda_build.sources()[stem]
        cub = cuda_build.cubin(path, defines=defines)
        self.functions = S.split_functions(cuda_build.disassemble(cub))
        self.res = S.parse_res_usage(cuda_build.res_usage(cub))
        self.names = cuda_build.demangle(self.functions)

    @classmethod
    def get(cls, stem: str, defines: Tuple[str, ...] = ()) -> "_CudaFile":
        if (stem, defines) not in cls._cache:
            cls._cache[stem, defines] = cls(stem, defines)
        return cls._cache[stem, defines]

    def function(self, pattern: str):
        mangled = cuda_build.find_function(self.names, pattern)
        if mangled is None:
            raise LookupError(f"no function matching {pattern!r}; have {sorted(self.names.values())}")
        return self.functions[mangled], self.res[mangled]


def _cuda(stem: str, pattern: str, defines: Tuple[str, ...] = ()):
    return lambda: _CudaFile.get(stem, defines).function(pattern)


def int4mma_block_n(mt: int, fp: int) -> int:
    """Output rows per CTA of int4_mma_kernel<T, TS, MT, FP> (int4_mma.cu's Cfg::kBlockN)."""
    tiles = (4 if fp >= 4 else 2) if mt <= 2 else (2 if fp >= 4 else 1) if mt == 4 else 1
    return 4 * tiles * 16


def int4mma_smem(mt: int, fp: int) -> int:
    """Dynamic shared memory of int4_mma_kernel<T, TS, MT, FP> (Cfg::kTotal): four pipeline
    stages of 128-deep codes, x rows and one scale and zero row per scale period."""
    bn = int4mma_block_n(mt, fp)
    codes, x, scales = bn * 128 // 2, mt * 8 * 128 * 2, (8 // fp) * bn * 2
    return 4 * (codes + x + 2 * scales)


def int4mma_splits(n: int, k: int, m: int, block_n: int, sms: int) -> int:
    """K splits the launcher plans (about two CTAs per SM, two 128-deep stages per split
    at least, partials within 4 MiB); tests/benchmarks checks it against cuda_mma.plan_splits."""
    stages = cdiv(k, 128)
    splits = max(1, min(stages // 2, round(2 * sms / cdiv(n, block_n)), (4 << 20) // (4 * m * n)))
    return cdiv(stages, cdiv(stages, splits))


def int4mma_variants(gpu: gpu_model.GpuModel = gpu_model.H100) -> List[Variant]:
    """The tensor-core int4 kernel at group 128, fp16: its M <= 8, <= 16 and <= 64 builds."""
    out = []
    for mt, m in ((1, 1), (2, 16), (8, 64)):
        bn = int4mma_block_n(mt, 8)

        def splits(n, k, m, bn=bn):
            return int4mma_splits(n, k, m, bn, gpu.sms)
        out.append(Variant(
            "cuda_int4mma_qmatmul", f"int4 g128 fp16 MT={mt} (M<={8 * mt})", (m,), 128, bn,
            grid=lambda n, k, m, bn=bn, splits=splits: cdiv(n, bn) * splits(n, k, m),
            # split-K partials are not counted: capped at 4 MiB, they stay in L2
            nbytes=lambda n, k, m: int4_g128_bytes(n, k) + act_bytes(n, k, m),
            visits=lambda n, k, m: n * k,
            build=_cuda("int4_mma", rf"int4_mma_kernel<__half, __half, {mt}, 8>"), marker="HMMA",
            dynamic_smem=int4mma_smem(mt, 8)))
    return out


def w8a8_sm90_variants(gpu: gpu_model.GpuModel = gpu_model.H100) -> List[Variant]:
    """The Hopper W8A8 GEMM (w8a8_sm90.cu, CUTLASS) in its two tile shapes, fp16 out,
    and its activation quantizer. Persistent kernels: about one CTA per SM in
    clusters (1 x 8 along N for the small tiles, 2 x 1 along M for the large), each
    CTA as much shared memory as CUTLASS's stage count fills (its carve-out
    leaves one CTA per SM); the main loop is the consumer warpgroups' IGMMA loop."""
    out = []
    for label, (tm, tn, tk), threads, ms, pattern in (
            ("64x64x256, clusters 1x8 (M<=128)", (64, 64, 256), 256, (16, 128), "MMA_64x64x32_S32S8U8"),
            ("128x128x128, clusters 2x1 (M>128)", (128, 128, 128), 384, (2048,), "MMA_64x128x32_S32S8U8")):

        def grid(n, k, m, tm=tm, tn=tn):
            return min(cdiv(m, tm) * cdiv(n, tn), gpu.sms)

        def nbytes(n, k, m):
            kp = cdiv(k, 32) * 32  # weight codes and the quantized x, one byte a column; fp32 vectors
            return n * kp + 4 * 2 * n + m * kp + 4 * 2 * m + 2 * m * n

        out.append(Variant(
            "cuda_int8_w8a8_matmul_sm90", f"int8 pc fp16 {label}", ms, threads, 0,
            grid=grid, nbytes=nbytes, visits=lambda n, k, m, tm=tm: n * cdiv(k, 32) * 32 * cdiv(m, tm),
            build=_cuda("w8a8_sm90", rf"^(?!.*bfloat16_t).*{pattern}"), marker="IGMMA",
            dynamic_smem=gpu.smem_per_sm - gpu.smem_reserved_per_cta - 1024,
            tensor_ops=lambda n, k, m, tm=tm, tn=tn, tk=tk: 2.0 * (cdiv(m, tm) * tm) * (cdiv(n, tn) * tn)
            * (cdiv(k, tk) * tk)))
    return out


def int4mma_sm90_variants(gpu: gpu_model.GpuModel = gpu_model.H100) -> List[Variant]:
    """The Hopper int4 GEMM (int4mma_sm90.cu, CUTLASS mixed input) on IntMMA g128 weights,
    fp16: 128 x 128 x 64 tiles, two consumer warpgroups, persistent (one CTA per SM, its
    stage count filling shared memory). x is re-read by every column of N tiles, from L2:
    counted once."""
    tm, tn, tk = 128, 128, 64
    return [Variant(
        "cuda_int4mma_qmatmul_sm90", "int4 g128 fp16 128x128x64 (M>64)", (128, 512, 2048), 384, 0,
        grid=lambda n, k, m: min(cdiv(m, tn) * cdiv(n, tm), gpu.sms),
        nbytes=lambda n, k, m: int4_g128_bytes(n, k) + act_bytes(n, k, m),
        visits=lambda n, k, m: n * k * cdiv(m, tn),
        build=_cuda("int4mma_sm90", r"^(?!.*bfloat16_t).*GemmUniversal"), marker="HGMMA",
        dynamic_smem=gpu.smem_per_sm - gpu.smem_reserved_per_cta - 1024,
        tensor_ops=lambda n, k, m: 2.0 * (cdiv(n, tm) * tm) * (cdiv(m, tn) * tn) * (cdiv(k, tk) * tk),
        tensor_kind="fp16")]


def w8a8_quantizer_variant() -> Variant:
    return Variant(
        "cuda_int8_w8a8_matmul_sm90", "activation quantizer (per row, 16-byte loads)", (), 128, 1,
        grid=lambda n, k, m: m, nbytes=lambda n, k, m: 0, visits=lambda n, k, m: 0,
        build=_cuda("quantize_rows_w8a8", r"quantize_rows_w8a8_kernel<__half, true>"))


def cuda_variants() -> List[Variant]:
    out = []
    for m in (1, 4):
        # 16 rows per CTA (4 warps x 4 rows); a lane owns one 32-code chunk of its 4 rows per tile
        out.append(Variant(
            "cuda_int4_qmatmul_gemv", f"int4 g128 fp16 M={m}", (m,), 128, 4 * 32,
            grid=lambda n, k, m: cdiv(n, 16),
            nbytes=lambda n, k, m: int4_g128_bytes(n, k) + act_bytes(n, k, m),
            visits=lambda n, k, m: n * k,
            build=_cuda("int4_gemv", rf"int4_gemv_kernel<{m}, __half>")))
    out.extend(int4mma_variants())
    # 64 x 128 output tile, 64-wide K tiles, 128 threads: 128 * 64 weights per tile
    out.append(Variant(
        "cuda_int8_w8a8_matmul", "int8 pc fp16 (GEMM)", (16, 128, 2048), 128, 128 * 64 / 128,
        grid=lambda n, k, m: cdiv(n, 128) * cdiv(m, 64),
        nbytes=lambda n, k, m: n * cdiv(k, 32) * 32 + 2 * n + m * (2 * k + 2 * cdiv(k, 32) * 32 + 4) + 2 * m * n,
        visits=lambda n, k, m: n * cdiv(k, 32) * 32 * cdiv(m, 64),
        build=_cuda("w8a8", r"w8a8_gemm_kernel<__half>")))
    out.append(Variant(
        "cuda_int8_w8a8_matmul", "activation quantizer (per row)", (), 256, 1,
        grid=lambda n, k, m: m, nbytes=lambda n, k, m: 0, visits=lambda n, k, m: 0,
        build=_cuda("w8a8", r"quantize_rows_int8_kernel<__half>")))
    out.extend(w8a8_sm90_variants())
    out.append(w8a8_quantizer_variant())
    out.extend(int4mma_sm90_variants())
    # one thread per 32-code chunk of a row, 128 threads across the row, grid rows striding over rows;
    # built with its fast path alone (fp16 scales, integral zeros: what int4 g128 checkpoints hold)
    # so the count is the path that runs, not both sides of the branch
    out.append(Variant(
        "cuda_int_dequantize", "int4 g128 -> fp16 (fast path)", (0,), 128, 32,
        grid=lambda n, k, m: cdiv(cdiv(k, 32), 128) * n,
        nbytes=lambda n, k, m: int4_g128_bytes(n, k) + 2 * n * k,
        visits=lambda n, k, m: n * k,
        build=_cuda("int_dequant", r"int_dequant_kernel<__half, 4>", ("PYQUANT_DEQUANT_FAST_PATH_ONLY",)),
        marker="STG.E.128"))  # the loop over rows that stores whole chunks
    # 32 consecutive outputs (half an NF4 block) per thread
    out.append(Variant(
        "cuda_nf4_dequantize", "nf4 b64 -> fp16", (0,), 256, 32,
        grid=lambda n, k, m: cdiv(cdiv(n * k, 32), 256),
        nbytes=lambda n, k, m: n * k // 2 + n * k // 64 * 4 + 2 * n * k,
        visits=lambda n, k, m: n * k,
        build=_cuda("nf4_dequant", r"nf4_dequant_kernel<__half>"), whole_kernel=True))
    out.append(Variant(
        "cuda_gguf_dequantize", "Q4_K -> fp16", (0,), 256, 8,
        grid=lambda n, k, m: cdiv(cdiv(n * k, 8), 256),
        nbytes=lambda n, k, m: n * k // 256 * 144 + 2 * n * k,
        visits=lambda n, k, m: n * k,
        build=_cuda("gguf_dequant", r"gguf_dequant_kernel<12, __half>"), whole_kernel=True))
    # solvers: resources only (they run at quantization time, not on the benchmark shapes)
    out.append(Variant("cuda_int_gptq_block_update", "block 128 (8 slots, 4 rows)", (), 128, 0,
                       grid=lambda n, k, m: 0, nbytes=lambda n, k, m: 0, visits=lambda n, k, m: 0,
                       build=_cuda("gptq_block", r"gptq_block_kernel<8, 4>")))
    out.append(Variant("cuda_int_hqq_solve", "fp32 groups", (), 128, 0,
                       grid=lambda n, k, m: 0, nbytes=lambda n, k, m: 0, visits=lambda n, k, m: 0,
                       build=_cuda("hqq_solver", r"hqq_solve_kernel")))
    return out


# --- Triton kernels ---------------------------------------------------------------
def _triton(fn_name: str, consts: dict, cfg):
    def build():
        from ..matmul import dequant, gemv_packed, mm_packed

        fn = {"gemv_packed_kernel": gemv_packed.gemv_packed_kernel, "mm_int_kernel": mm_packed.mm_int_kernel,
              "dequant_kernel": dequant.dequant_kernel}[fn_name]
        c = S.compile_sm90(fn, consts, {}, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        res = S.resource_usage(c)
        res["smem"] = max(res["smem"], int(getattr(c.metadata, "shared", 0) or 0))
        return S.parse_sass(S.disassemble(c)), res

    return build


def triton_variants(sms: int = gpu_model.H100.sms) -> List[Variant]:
    from ..tuning.configs import default_config, gemv_bm, resolve_split

    out = []
    common = dict(HAS_PERM=False, HAS_BIAS=False, SOFT_BF16=False)
    for m in (1, 4):  # word-wise GEMV, two K tiles per loop iteration
        c = default_config("gemv", m, packed=True)
        bm = min(4, gemv_bm(m))

        def grid(n, k, m, c=c, bm=bm):
            tiles = cdiv(n, c.BN)
            split, _ = resolve_split(dataclasses.replace(c, BK=max(32, c.BK)), tiles, k, sms, waves=1)
            return tiles * split * cdiv(m, bm)

        def nbytes(n, k, m, c=c):
            split, _ = resolve_split(c, cdiv(n, c.BN), k, sms, waves=1)
            return int4_g128_bytes(n, k) + act_bytes(n, k, m) + (2 * 4 * split * m * n if split > 1 else 0)

        out.append(Variant(
            "triton_any_qmatmul_gemv", f"int4 g128 fp16 M={m}", (m,), 32 * c.num_warps,
            2 * c.BN * c.BK / (32 * c.num_warps), grid, nbytes, lambda n, k, m: n * k,
            _triton("gemv_packed_kernel", dict(common, BITS=4, HAS_ZERO=True, GSHIFT=7, BM=bm, BN=c.BN, BK=c.BK,
                                               SPLIT=1, X16=1, NF4=False, DQ=False), c)))
    for path, ms in (("splitk", (16,)), ("splitk", (64,)), ("gemm", (128,)), ("gemm", (512, 2048))):
        c = default_config(path, ms[0], packed=True)
        bk = min(max(32, c.BK), 128)  # launch.mm_bk for group 128

        def tiles_split(n, k, m, c=c, bk=bk, path=path):
            tiles = cdiv(m, c.BM) * cdiv(n, c.BN)
            if path == "gemm" and c.SPLIT <= 1:
                return tiles, 1
            return tiles, resolve_split(dataclasses.replace(c, BK=bk), tiles, k, sms)[0]

        def grid(n, k, m, ts=tiles_split):
            tiles, split = ts(n, k, m)
            return tiles * split

        def nbytes(n, k, m, ts=tiles_split, c=c):
            _, split = ts(n, k, m)
            # x is re-read by every N tile column, but from L2: count it once
            return int4_g128_bytes(n, k) + act_bytes(n, k, m) + (2 * 4 * split * m * n if split > 1 else 0)

        out.append(Variant(
            f"triton_any_qmatmul_{path}", f"int4 g128 fp16 M={'/'.join(map(str, ms))}", ms, 32 * c.num_warps,
            c.BN * bk / (32 * c.num_warps), grid, nbytes, lambda n, k, m, c=c: n * k * cdiv(m, c.BM),
            _triton("mm_int_kernel", dict(common, BITS=4, HAS_ZERO=True, GSHIFT=7, BM=c.BM, BN=c.BN, BK=bk,
                                          SPLIT=4 if path == "splitk" else 1, GROUP_M=c.GROUP_M, X_F32=False,
                                          UPCAST_DOT=False, SCALE_W=c.BM > 16 or bk < 64), c)))
    c = default_config("dequant", 0)
    out.append(Variant(
        "triton_any_dequantize", "int4 g128 -> fp16", (0,), 32 * c.num_warps, c.BN * c.BK / (32 * c.num_warps),
        grid=lambda n, k, m, c=c: cdiv(n, c.BN) * cdiv(k, c.BK),
        nbytes=lambda n, k, m: int4_g128_bytes(n, k) + 2 * n * k, visits=lambda n, k, m: n * k,
        build=_triton("dequant_kernel", dict(FMT=1, C0=4, C1=1, C2=7, UNIFORM=True, HAS_PERM=False, BN=c.BN,
                                             BK=c.BK, SOFT_BF16=False), c),
        whole_kernel=True))
    return out


# --- the report -------------------------------------------------------------------
def kernel_rows(variants: List[Variant], gpu: gpu_model.GpuModel = gpu_model.H100) -> List[KernelRow]:
    rows = []
    for v in variants:
        instrs, res = v.build()
        res = {**res, "smem": res["smem"] + v.dynamic_smem}
        st = S.stats_of(f"{v.kernel}: {v.label}", instrs, res, v.weights_per_iter, v.whole_kernel, v.marker)
        rows.append(KernelRow(v.kernel, v.label, v.threads, st, gpu_model.occupancy(st.regs, st.smem, v.threads, gpu)))
    return rows


def shape_rows(variants: List[Variant], rows: List[KernelRow], shapes=SHAPES,
               gpu: gpu_model.GpuModel = gpu_model.H100) -> List[dict]:
    out = []
    for v, r in zip(variants, rows):
        for n, k in shapes:
            for m in v.ms:
                ctas = v.grid(n, k, m)
                bw = gpu_model.bandwidth_us(v.nbytes(n, k, m), gpu)
                per_w = r.stats.per_weight
                if v.tensor_ops is not None:
                    issue, what = gpu_model.tensor_us(v.tensor_ops(n, k, m), v.tensor_kind, gpu), "tensor cores"
                else:
                    issue = gpu_model.issue_us(per_w * v.visits(n, k, m), gpu) if math.isfinite(per_w) else math.nan
                    what = "issue"
                out.append({"kernel": v.kernel, "variant": v.label, "n": n, "k": k, "m": m, "ctas": ctas,
                            "waves": gpu_model.waves(ctas, r.occ, gpu), "mbytes": v.nbytes(n, k, m) / 1e6,
                            "bandwidth_us": bw, "issue_us": issue,
                            "bound": what if issue > bw else "bandwidth"})
    return out


def _widths(st: S.SassStats) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(S.mem_widths(st.loop_mem).items())) or "-"


def markdown(rows: List[KernelRow], shapes: List[dict], gpu: gpu_model.GpuModel = gpu_model.H100) -> str:
    lines = [f"## Kernels on {gpu.name}: sm_90a machine code", "",
             "| kernel | variant | regs | spill B | smem B | threads | CTAs/SM (limit) | occupancy | loop instr | "
             "weights/thread/iter | instr/weight | loop loads/stores (kind.bits x count) |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        st = r.stats
        pw = f"{st.per_weight:.2f}" if math.isfinite(st.per_weight) else "-"
        lines.append(f"| {r.kernel} | {r.label} | {st.regs} | {st.local} | {st.smem} | {r.threads} | "
                     f"{r.occ.ctas_per_sm} ({r.occ.limit}) | {r.occ.fraction:.0%} | {st.loop} | "
                     f"{st.weights_per_iter:g} | {pw} | {_widths(st)} |")
    lines += ["", f"## Predicted on the benchmark shapes ({gpu.hbm_bytes_per_s / 1e12:.2f} TB/s HBM, "
              f"{gpu.sms} SMs at {gpu.clock_hz / 1e9:.2f} GHz)", "",
              "| kernel | variant | N x K | M | CTAs | waves | MB moved | bandwidth-bound us | issue-bound us (wgmma: "
              "tensor cores) | bound |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in shapes:
        issue = f"{s['issue_us']:.1f}" if math.isfinite(s["issue_us"]) else "-"
        lines.append(f"| {s['kernel']} | {s['variant']} | {s['n']}x{s['k']} | {s['m']} | {s['ctas']} | "
                     f"{s['waves']:.2f} | {s['mbytes']:.1f} | {s['bandwidth_us']:.1f} | {issue} | {s['bound']} |")
    return "\n".join(lines)


def variants(only: Optional[str] = None, cuda: bool = True, triton: bool = True) -> List[Variant]:
    vs = (cuda_variants() if cuda else []) + (triton_variants() if triton else [])
    return [v for v in vs if not only or only in v.kernel or only in v.label]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="kernels or variants whose name contains this text")
    ap.add_argument("--no-cuda", action="store_true", help="leave out the CUDA C++ kernels")
    ap.add_argument("--no-triton", action="store_true", help="leave out the Triton kernels")
    ap.add_argument("--json", help="write both tables' rows to this file")
    args = ap.parse_args(argv)
    vs = variants(args.only, cuda=not args.no_cuda, triton=not args.no_triton)
    rows = kernel_rows(vs)
    shapes = shape_rows(vs, rows)
    print(markdown(rows, shapes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kernels": [r.as_dict() for r in rows], "shapes": shapes}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
