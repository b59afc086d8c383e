"""The CUDA kernels' sm_90a machine code as the tensor-core tests read it (no GPU
needed): one ``csrc/cuda`` file compiled by the offline report's build
(``pyquant.triton_kernels.tools.cuda_build``), every kernel function reduced to
registers, spills, shared memory, its main loop (``sass.main_loop``), instructions
per weight in that loop, and the loop's memory instructions by kind and width.

    python -m tests.ops.cuda_sass csrc/cuda/int4_mma.cu   # table of every kernel

Not a test module (no test_ prefix): tests/ops/test_int4_mma_sass.py and the
dequantize SASS test use it.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

from pyquant.triton_kernels.tools import cuda_build
from pyquant.triton_kernels.tools.sass import main_loop, opcode, parse_res_usage, split_functions

ROOT = Path(__file__).resolve().parents[2]
ARCH = cuda_build.ARCH


def missing_tools() -> Optional[str]:
    """Why the SASS checks cannot run here, or None."""
    try:
        cuda_build.nvcc()
        cuda_build.cuobjdump()
    except cuda_build.ToolMissing as exc:
        return str(exc)
    return None


def demangle_short(name: str) -> str:
    """``_ZN...int4_mma_kernelI6__halfS2_Li1ELi8EEE...`` -> ``int4_mma_kernel<__half, __half, 1, 8>``."""
    full = cuda_build.demangle([name])[name]
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


def kernels(source: str, arch: str = ARCH, marker: Optional[str] = None, defines: tuple = ()) -> List[KernelSass]:
    cubin = cuda_build.cubin(ROOT / source, arch, tuple(defines))
    usage = parse_res_usage(cuda_build.res_usage(cubin))
    out = []
    for name, instrs in split_functions(cuda_build.disassemble(cubin)).items():
        res = usage.get(name, {"regs": 0, "stack": 0, "smem": 0, "local": 0})
        out.append(KernelSass(name, res["regs"], res["stack"] + res["local"], res["smem"], [t for _, t in instrs],
                              main_loop(instrs, marker)))
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
