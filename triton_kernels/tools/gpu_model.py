"""A paper model of one GPU: occupancy, waves and the time a kernel cannot beat.

No GPU and no triton needed. The figures are the data-sheet values of the H100
SXM (sm_90a), the target of the offline SASS report; ``GpuModel`` takes any
other card's values. What the model predicts:

* occupancy: CTAs per SM allowed by registers (allocated per warp in units of
  256), shared memory (per CTA plus the 1 KB the driver reserves, 128-byte
  units), threads and the CTA slot limit, and the warps that leaves resident;
* waves: CTAs of a launch over the CTAs all SMs hold at once (a fraction just
  above a whole number means a tail wave that runs nearly empty);
* bandwidth-bound time: bytes moved / HBM bandwidth, the floor of a
  memory-bound kernel (decode GEMV, dequantize);
* issue-bound time: warp instructions / (SMs x 4 schedulers x clock), the floor
  from the instruction count of the main loop (a kernel whose issue-bound time
  exceeds its bandwidth-bound time cannot reach HBM speed, however it is tuned).
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class GpuModel:
    name: str = "H100 SXM (sm_90a)"
    sms: int = 132
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_unit: int = 256  # registers are allocated per warp in units of 256
    smem_per_sm: int = 233472  # 228 KB
    smem_reserved_per_cta: int = 1024
    smem_unit: int = 128
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32
    schedulers_per_sm: int = 4
    clock_hz: float = 1.755e9  # boost clock
    hbm_bytes_per_s: float = 3.35e12
    int8_tensor_ops_per_s: float = 1.979e15  # dense INT8 wgmma (H100 SXM datasheet)
    fp16_tensor_flops_per_s: float = 0.989e15  # dense FP16/BF16 wgmma, fp32 accumulation


H100 = GpuModel()


@dataclasses.dataclass(frozen=True)
class Occupancy:
    ctas_per_sm: int
    warps_per_sm: int
    limit: str  # what bounds it: "registers", "shared memory", "threads" or "CTA slots"

    @property
    def fraction(self) -> float:
        return self.warps_per_sm / 64


def occupancy(regs: int, smem: int, threads: int, gpu: GpuModel = H100) -> Occupancy:
    """CTAs and warps resident per SM for a kernel of ``regs`` registers per thread,
    ``smem`` bytes of shared memory per CTA and ``threads`` per CTA."""
    warps = max(1, math.ceil(threads / 32))
    regs_per_warp = math.ceil(max(regs, 1) * 32 / gpu.reg_unit) * gpu.reg_unit
    by = {
        "registers": (gpu.regs_per_sm // regs_per_warp) // warps,
        "threads": gpu.max_threads_per_sm // (warps * 32),
        "CTA slots": gpu.max_ctas_per_sm,
    }
    smem_cta = math.ceil((smem + gpu.smem_reserved_per_cta) / gpu.smem_unit) * gpu.smem_unit
    by["shared memory"] = gpu.smem_per_sm // smem_cta
    limit = min(by, key=lambda k: by[k])
    ctas = by[limit]
    return Occupancy(ctas, ctas * warps, limit)


def waves(ctas: int, occ: Occupancy, gpu: GpuModel = H100) -> float:
    """Launch size over the CTAs the whole GPU holds at once."""
    per_gpu = occ.ctas_per_sm * gpu.sms
    return ctas / per_gpu if per_gpu else math.inf


def bandwidth_us(nbytes: float, gpu: GpuModel = H100) -> float:
    return nbytes / gpu.hbm_bytes_per_s * 1e6


def tensor_us(ops: float, kind: str = "int8", gpu: GpuModel = H100) -> float:
    """Microseconds of ``ops`` (2 x multiply-adds) on every tensor core at peak, for
    ``kind`` "int8" or "fp16" (fp16 and bf16 inputs)."""
    rate = gpu.int8_tensor_ops_per_s if kind == "int8" else gpu.fp16_tensor_flops_per_s
    return ops / rate * 1e6


def issue_us(thread_instructions: float, gpu: GpuModel = H100) -> float:
    """Microseconds to issue ``thread_instructions`` (per-thread count x threads),
    one warp instruction per scheduler and clock."""
    return thread_instructions / 32 / (gpu.sms * gpu.schedulers_per_sm * gpu.clock_hz) * 1e6
