"""Offline sm_90a builds of the CUDA kernels and what their machine code says
(no GPU needed): nvcc compiles one .cu file of csrc/cuda to a cubin, Triton's
bundled cuobjdump disassembles it, and every kernel function is reduced to
the figures the tensor-core issue holds the kernels to: registers, spills,
shared memory, its main loop (the backward branch with the longest body),
instructions per weight in that loop, and the loop's memory instructions by
kind and width.

    python -m tests.ops.cuda_sass csrc/cuda/int4_mma.cu   # table of every kernel

Not a test module (no test_ prefix): tests/ops/test_int4_mma_sass.py and the
dequantize SASS test use it.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from pyquant.triton_kernels.tools.sass import opcode, parse_sass

ROOT = Path(__file__).resolve().parents[2]
ARCH = "sm_90a"


def nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def cuobjdump() -> Optional[str]:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def missing_tools() -> Optional[str]:
    """Why the SASS checks cannot run here, or None."""
    if nvcc() is None:
        return "nvcc not found (CUDA toolkit not installed)"
    if cuobjdump() is None:
        return "cuobjdump not found (neither the CUDA toolkit's nor Triton's bundled one)"
    return None


@functools.lru_cache(maxsize=None)
def compile_cubin(source: str, arch: str = ARCH, defines: tuple = ()) -> bytes:
    """``source`` (a path relative to the repository) -> cubin bytes, with the
    build's flags (plus ``-D`` ``defines``)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "k.cubin")
        cmd = [nvcc(), "-std=c++17", "-O3", f"-arch={arch}", "--expt-relaxed-constexpr", "-cubin",
               f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}", *[f"-D{x}" for x in defines],
               "-o", out, str(ROOT / source)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        return Path(out).read_bytes()


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(cubin)
        return subprocess.run([cuobjdump(), flag, path], capture_output=True, text=True, check=True).stdout


def demangle_short(name: str) -> str:
    """``_ZN...int4_mma_kernelI6__halfS2_Li1ELi8EEE...`` -> ``int4_mma_kernel<__half, __half, 1, 8>``."""
    tool = shutil.which("c++filt")
    if tool is None:
        return name
    full = subprocess.run([tool, name], capture_output=True, text=True).stdout.strip()
    m = re.search(r"(\w+<.*>)\(", full)
    return m.group(1) if m else full


@dataclasses.dataclass
class KernelSass:
    name: str  # mangled
    regs: int
    spill: int  # local memory bytes per thread (stack + spills)
    smem_static: int
    instrs: List[str]
    loop: List[str]

    @property
    def short(self) -> str:
        return demangle_short(self.name)

    def ops(self, instrs=None) -> collections.Counter:
        return collections.Counter(opcode(t) for t in (self.loop if instrs is None else instrs))

    def loop_mem(self) -> Dict[str, int]:
        return {k: v for k, v in self.ops().items() if k.startswith(_MEM_PREFIX)}

    def has(self, prefix: str) -> bool:
        return any(op.startswith(prefix) for op in self.ops())


_MEM_PREFIX = ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LDGSTS", "LDSM", "STSM", "ATOM", "RED", "LD.", "ST.")


def main_loop(instrs, marker: Optional[str] = None):
    """Instructions of a kernel's main loop: among its backward branches, the
    one whose body holds the most ``marker`` instructions (an opcode prefix:
    ``HMMA`` for a tensor-core loop, ``STG`` for a dequantizer), the innermost
    of those on a tie; without a marker, the longest body."""
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
        best = max(loops, key=lambda r: r[1] - r[0])
    else:
        best = max(loops, key=lambda r: (sum(opcode(t).startswith(marker) for t in body(r)), -(r[1] - r[0])))
    return body(best)


def kernels(source: str, arch: str = ARCH, marker: Optional[str] = None, defines: tuple = ()) -> List[KernelSass]:
    cubin = compile_cubin(source, arch, tuple(defines))
    sass = _cuobjdump(cubin, "-sass")
    res = _cuobjdump(cubin, "-res-usage")
    usage = {}
    for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res):
        usage[m.group(1)] = (int(m.group(2)), int(m.group(3)) + int(m.group(5)), int(m.group(4)))
    out = []
    chunks = re.split(r"\n\s*Function : (\S+)\n", sass)
    for name, body in zip(chunks[1::2], chunks[2::2]):
        instrs = parse_sass(body)
        regs, spill, smem = usage.get(name, (0, 0, 0))
        out.append(KernelSass(name, regs, spill, smem, [t for _, t in instrs], main_loop(instrs, marker)))
    return out


def table(rows: List[KernelSass], weights_per_iter) -> str:
    """Markdown table; ``weights_per_iter(kernel)`` = weights one thread handles per main-loop iteration."""
    lines = ["| kernel | regs | spill B | loop instr | weights/thread/iter | instr/weight | BSSY/CALL in loop | "
             "loop memory ops |", "|---|---|---|---|---|---|---|---|"]
    for k in rows:
        w = weights_per_iter(k)
        mem = ", ".join(f"{op} x{n}" for op, n in sorted(k.loop_mem().items()))
        bad = "yes" if k.has("BSSY") or k.has("CALL") else "no"
        per = f"{len(k.loop) / w:.2f}" if w else "-"
        lines.append(f"| {k.short} | {k.regs} | {k.spill} | {len(k.loop)} | {w or '-'} | {per} | {bad} | {mem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    src = sys.argv[1] if len(sys.argv) > 1 else "csrc/cuda/int4_mma.cu"
    print(table(kernels(src, marker=sys.argv[2] if len(sys.argv) > 2 else None), lambda k: 0))
