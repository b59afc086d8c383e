"""Offline sm_90 builds of the kernels and what their machine code says (no GPU needed).

    python -m pyquant.triton_kernels.tools.sass            # table of the representative variants
    python -m pyquant.triton_kernels.tools.sass --dump DIR # also writes each variant's SASS / PTX / TTGIR

Compiles with Triton's own pipeline and bundled ptxas for ``GPUTarget("cuda", 90, 32)``
and disassembles the cubin with the bundled ``cuobjdump``. Reported per variant:

* registers per thread, local memory (spills), shared memory;
* the main loop (the backward branch with the longest body): its instruction count,
  instructions per weight (loop instructions / weights each thread handles per
  iteration; weights counted once, whatever M), and its memory instructions by kind
  and width (``LDG.E.128`` = 16-byte global loads, ``LDG.E.U8`` = single bytes,
  ``LDGSTS`` = cp.async into shared memory, ``STL``/``LDL`` = spills).

Arguments are specialised as the JIT specialises real launches: pointers 16-byte
aligned and the sizes (N, K, row bytes) multiples of 16, as for the Llama shapes.
Must run without ``TRITON_INTERPRET`` (the interpreter has no compiled kernels).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

TYPES = {
    "out": "*fp16", "perm": "*i32", "x": "*fp16", "ws": "*fp32", "bias": "*fp16",
    "p0": "*u8", "p1": "*fp16", "p2": "*fp16", "p3": "*u8", "p4": "*fp32", "p5": "*fp32",
    "qw": "*u8", "sc": "*fp16", "zr": "*fp16", "aux0": "*fp32", "aux1": "*fp32", "aux2": "*fp32",
    "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32", "i0": "i32", "i1": "i32",
    "row_bytes": "i32", "ng": "i32",
}
# sizes the JIT sees as multiples of 16 for the Llama shapes (M and group counts are not)
ALIGNED_INTS = ("N", "K", "k_per_split", "i0", "row_bytes")


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_sm90(fn, constexprs: dict, types: Optional[dict] = None, aligned: bool = True, **options):
    """Compile ``fn`` (a ``triton.jit`` function) for sm_90; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if type(fn).__name__ != "JITFunction":
        raise RuntimeError("the kernels were built for the interpreter: unset TRITON_INTERPRET")
    t = dict(TYPES, **(types or {}))
    sig = {n: ("constexpr" if n in constexprs else t[n]) for n in fn.arg_names}
    attrs = {}
    if aligned:
        for i, n in enumerate(fn.arg_names):
            if n not in constexprs and (t[n].startswith("*") or n in ALIGNED_INTS):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


@dataclasses.dataclass
class SassStats:
    name: str
    regs: int
    local: int  # bytes of local memory per thread (spills)
    smem: int
    total: int  # instructions in the kernel
    loop: int  # instructions in the main loop
    weights_per_iter: float  # weights one thread handles per main-loop iteration
    loop_ops: Dict[str, int]
    loop_mem: Dict[str, int]

    @property
    def per_weight(self) -> float:
        return self.loop / self.weights_per_iter if self.weights_per_iter else float("nan")

    def row(self) -> str:
        mem = ", ".join(f"{k} x{v}" for k, v in sorted(self.loop_mem.items()))
        return (f"| {self.name} | {self.regs} | {self.local} | {self.loop} | {self.weights_per_iter:g} | "
                f"{self.per_weight:.2f} | {mem} |")


HEADER = ("| variant | regs | spill B | loop instr | weights/thread/iter | instr/weight | loop memory ops |\n"
          "|---|---|---|---|---|---|---|")

_MEM_PREFIX = ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LDGSTS", "LDSM", "STSM", "SHFL", "BAR", "ATOM", "RED")


def disassemble(compiled) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout


def resource_usage(compiled) -> Dict[str, int]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "smem": int(m.group(3)), "local": int(m.group(4))}


_INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(sass: str):
    """-> [(address, instruction text)] of the first function in ``sass``."""
    out = []
    for line in sass.splitlines():
        if out and "Function :" in line:
            break
        m = _INSTR.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def split_functions(sass: str) -> Dict[str, list]:
    """-> {mangled function name: [(address, instruction text)]} of every function
    in a ``cuobjdump -sass`` listing (a cubin of nvcc holds every template instance)."""
    out: Dict[str, list] = {}
    cur = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = _INSTR.match(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def parse_res_usage(text: str) -> Dict[str, Dict[str, int]]:
    """-> {mangled function name: {regs, stack, smem, local}} from ``cuobjdump -res-usage``."""
    out = {}
    name = None
    for line in text.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name is not None:
            out[name] = {"regs": int(m.group(1)), "stack": int(m.group(2)), "smem": int(m.group(3)),
                         "local": int(m.group(4))}
            name = None
    return out


def mem_widths(mem_ops: Dict[str, int]) -> Dict[str, int]:
    """Memory instructions of a loop grouped by kind and access width in bits:
    ``{"LDG.128": 16, "LDG.8": 2, "STS.128": 4}`` (a kind without a width suffix is
    32 bits wide; ``LDGSTS`` is cp.async global -> shared)."""
    out: Dict[str, int] = {}
    for op, count in mem_ops.items():
        parts = op.split(".")
        kind = parts[0]
        if kind not in ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LDGSTS", "LDSM", "LD", "ST"):
            continue
        width = 32
        for p in parts[1:]:
            if p in ("U8", "S8"):
                width = 8
            elif p in ("U16", "S16"):
                width = 16
            elif p.isdigit():
                width = int(p)
        if kind == "LDSM":  # ldmatrix: x1/x2/x4 of 8x8 16-bit tiles per warp
            width = 128
        key = f"{kind}.{width}"
        out[key] = out.get(key, 0) + count
    return out


def opcode(text: str) -> str:
    parts = text.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


def main_loop(instrs, marker: Optional[str] = None):
    """Instructions of a kernel's main loop: the backward branch with the longest body,
    or with ``marker`` (an opcode prefix: ``HMMA`` for a tensor-core loop, ``STG`` for a
    dequantizer) the one whose body holds the most ``marker`` instructions, the
    innermost of those on a tie."""
    loops = []
    for pc, txt in instrs:
        m = re.search(r"\bBRA\s+(?:`?\(?\.L_x_\d+\)?|0x([0-9a-f]+))", txt)
        if m and m.group(1):
            target = int(m.group(1), 16)
            if target < pc:
                loops.append((target, pc))
    if not loops:
        return []

    def body(r):
        return [t for pc, t in instrs if r[0] <= pc <= r[1]]

    if marker is None:
        return body(max(loops, key=lambda r: r[1] - r[0]))
    return body(max(loops, key=lambda r: (sum(opcode(t).startswith(marker) for t in body(r)), -(r[1] - r[0]))))


def stats_of(name: str, instrs, res: Dict[str, int], weights_per_iter: float, whole_kernel: bool = False,
             marker: Optional[str] = None) -> SassStats:
    """SassStats of one function's instructions and resource usage. ``whole_kernel``: a
    kernel where each thread handles one tile counts as its own loop body; ``marker``: as
    in :func:`main_loop`. Counts are static: both sides of a branch in the loop count."""
    body = [t for _, t in instrs] if whole_kernel else main_loop(instrs, marker)
    ops = collections.Counter(opcode(t) for t in body)
    mem = {k: v for k, v in ops.items() if k.startswith(_MEM_PREFIX)}
    return SassStats(name, res["regs"], res["local"] + res["stack"], res["smem"], len(instrs), len(body),
                     weights_per_iter, dict(ops), mem)


def stats(name: str, compiled, weights_per_iter: float) -> SassStats:
    res = resource_usage(compiled)
    # Triton's shared memory is dynamic: cuobjdump sees none, the launch metadata has it
    res["smem"] = max(res["smem"], int(getattr(compiled.metadata, "shared", 0) or 0))
    return stats_of(name, parse_sass(disassemble(compiled)), res, weights_per_iter)


# --- representative variants ------------------------------------------------------
# Int4 group 128 asymmetric fp16 scales and zeros, fp16 activations: the format of
# the performance targets. "before" is the per-byte decoder of ``decode.w_tile``
# with the shipped configs of that kernel; "after" the word-wise kernels with
# theirs. Weights per thread and iteration = BN * BK / (32 * num_warps) per K tile
# the loop body handles (two in ``gemv_packed_kernel``).
def variants():
    """[(name, kernel, constexprs, types, options, weights per thread per iteration)]."""
    from ..matmul.gemv import gemv_kernel
    from ..matmul.gemv_packed import gemv_packed_kernel
    from ..matmul.mm import mm_kernel
    from ..matmul.mm_packed import mm_int_kernel
    from ..tuning.configs import _GEMV, _GEMV_PACKED, _SPLITK, _SPLITK_PACKED

    out = []
    mm_old = dict(HAS_PERM=False, HAS_BIAS=False, SOFT_BF16=False)
    for m in (1, 4):
        c = _GEMV[m]
        out.append((f"before: gemv int4 g128 M={m}", gemv_kernel,
                    dict(mm_old, FMT=1, C0=4, C1=1, C2=7, UNIFORM=True, BM=m, BN=c.BN, BK=c.BK, SPLIT=1),
                    {}, dict(num_warps=c.num_warps, num_stages=c.num_stages), c.BN * c.BK / (32 * c.num_warps)))
    c = _GEMV[1]
    out.append(("before: gemv nf4 b64 dq M=1", gemv_kernel,
                dict(mm_old, FMT=2, C0=64, C1=1, C2=0, UNIFORM=True, BM=1, BN=c.BN, BK=c.BK, SPLIT=1),
                {"p1": "*u8", "p2": "*fp32", "p3": "*fp32"}, dict(num_warps=c.num_warps, num_stages=c.num_stages),
                c.BN * c.BK / (32 * c.num_warps)))
    for m in (16, 64):
        c = _SPLITK[m]
        out.append((f"before: split-K int4 g128 M={m}", mm_kernel,
                    dict(mm_old, FMT=1, C0=4, C1=1, C2=7, UNIFORM=True, BM=c.BM, BN=c.BN, BK=c.BK, SPLIT=4,
                         GROUP_M=8, X_F32=False, UPCAST_DOT=False),
                    {}, dict(num_warps=c.num_warps, num_stages=c.num_stages), c.BN * c.BK / (32 * c.num_warps)))
    new = dict(HAS_PERM=False, HAS_BIAS=False, SOFT_BF16=False)
    for bits, zero, gs, label in ((4, True, 7, "int4 g128"), (4, False, 7, "int4 g128 sym"), (4, True, 0, "int4 pc"),
                                  (8, True, 7, "int8 g128")):
        for m in (1, 2, 4):
            if m > 1 and label != "int4 g128":
                continue
            c = _GEMV_PACKED[m]
            # its main loop handles two K tiles per iteration
            out.append((f"after: gemv {label} M={m}", gemv_packed_kernel,
                        dict(new, BITS=bits, HAS_ZERO=zero, GSHIFT=gs, BM=m, BN=c.BN, BK=c.BK, SPLIT=1, X16=1,
                             NF4=False, DQ=False),
                        {}, dict(num_warps=c.num_warps, num_stages=c.num_stages),
                        2 * c.BN * c.BK / (32 * c.num_warps)))
    c = _GEMV_PACKED[1]
    for dq, types in ((False, {"sc": "*fp32"}), (True, {"sc": "*u8", "zr": "*fp32"})):
        out.append((f"after: gemv nf4 b64{' dq' if dq else ''} M=1", gemv_packed_kernel,
                    dict(new, BITS=4, HAS_ZERO=False, GSHIFT=6, BM=1, BN=c.BN, BK=c.BK, SPLIT=1, X16=1, NF4=True,
                         DQ=dq), types, dict(num_warps=c.num_warps, num_stages=c.num_stages),
                    2 * c.BN * c.BK / (32 * c.num_warps)))
    for bits, zero, label in ((4, True, "int4 g128"), (4, False, "int4 g128 sym"), (8, True, "int8 g128")):
        for m in (16, 64):
            c = _SPLITK_PACKED[m]
            out.append((f"after: split-K {label} M={m}", mm_int_kernel,
                        dict(new, BITS=bits, HAS_ZERO=zero, GSHIFT=7, BM=c.BM, BN=c.BN, BK=c.BK, SPLIT=4,
                             GROUP_M=8, X_F32=False, UPCAST_DOT=False, SCALE_W=c.BM > 16),
                        {}, dict(num_warps=c.num_warps, num_stages=c.num_stages), c.BN * c.BK / (32 * c.num_warps)))
    return out


def report(dump: Optional[str] = None, only: Optional[str] = None) -> List[SassStats]:
    rows = []
    for name, fn, consts, types, opts, wpt in variants():
        if only and only not in name:
            continue
        c = compile_sm90(fn, consts, types, **opts)
        s = stats(name, c, wpt)
        rows.append(s)
        if dump:
            os.makedirs(dump, exist_ok=True)
            stem = os.path.join(dump, re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_"))
            with open(stem + ".sass", "w") as f:
                f.write(disassemble(c))
            for ext in ("ptx", "ttgir"):
                with open(f"{stem}.{ext}", "w") as f:
                    f.write(c.asm[ext])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dump", help="write SASS / PTX / TTGIR of each variant to this folder")
    ap.add_argument("--only", help="variants whose name contains this text")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    print(HEADER)
    for s in report(args.dump, args.only):
        print(s.row())
    return 0


if __name__ == "__main__":
    sys.exit(main())
