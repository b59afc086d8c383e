"""IEEE arithmetic the solvers share with their torch specs.

The specs (``pyquant/algorithms/hqq_reference.py``, ``gptq.py``) round half to
even, divide once (IEEE division) and round every step of the quantization
separately; the kernels do the same so that codes match the spec exactly.
"""
import triton
import triton.language as tl


@triton.jit
def rint(x):
    # Round half to even from floor (portable: the interpreter has no rint).
    f = tl.floor(x)
    d = x - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))


@triton.jit
def div(a, b):
    # IEEE division: a plain "/" lowers to div.full.f32 (2 ulp) on NVIDIA GPUs
    return tl.math.div_rn(a, b)


def exact_options(kernel, device) -> dict:
    """Launch options that keep a compiled kernel's multiply-adds rounded twice
    (no FMA contraction); the interpreter has no such option and needs none."""
    if device.type == "cuda" and type(kernel).__name__ != "InterpretedFunction":
        return {"enable_fp_fusion": False}
    return {}
