"""The solver ops as torch.library ops: opcheck (schema, fake kernel,
mutation annotations), dispatch through the one registry, and ``kernel=``
behaving as for every other op."""
import pytest
import torch

import pyquant
from pyquant import _ext
from pyquant.formats import GGUF, Int
from pyquant.ops import dispatch
from pyquant.ops.reference.gptq import gptq_block_update_reference

HAS_CPU = _ext.load() is not None
CPU_OR_REF = ["reference"] + (["cpu"] if HAS_CPU else [])


def _block_case(n=6, b=40, group=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, b, generator=g)
    A = torch.randn(b, b, generator=g)
    U = torch.linalg.cholesky(A @ A.T / b + torch.eye(b)).T.contiguous()
    ng = -(-b // group)
    scale = torch.rand(n, ng, generator=g) * 0.2 + 0.05
    zero = torch.full((n, ng), 8.0)
    return W, U, scale, zero


@pytest.mark.parametrize("kernel", CPU_OR_REF)
def test_gptq_block_update_opcheck_and_spec(kernel):
    W, U, scale, zero = _block_case()
    codes = torch.empty(6, 40, dtype=torch.uint8)
    err = torch.empty(6, 40)
    args = (W.clone(), U, scale, zero, 0, 40, 16, 15, codes, err, kernel)
    torch.library.opcheck(torch.ops.pyquant.gptq_block_update.default, args)
    W_ref, codes_ref, err_ref = W.clone(), torch.empty_like(codes), torch.empty_like(err)
    gptq_block_update_reference(W_ref, U, scale, zero, 0, 40, 16, 15, codes_ref, err_ref)
    W_k = W.clone()
    pyquant.ops.gptq_block_update(W_k, U, scale, zero, 0, 40, 16, 15, codes, err, kernel=kernel)
    assert torch.equal(codes, codes_ref)
    torch.testing.assert_close(W_k, W_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["hqq_solve", "hqq_solve_integer_zero"])
@pytest.mark.parametrize("kernel", CPU_OR_REF)
def test_hqq_ops_opcheck(op, kernel):
    w = torch.randn(5, 70, generator=torch.Generator().manual_seed(1)) * 0.05
    if op == "hqq_solve":
        args = (w, 4, 32, torch.float16, 5, 0.7, 10.0, 1.01, True, kernel)
    else:
        args = (w, 3, 32, torch.float16, 0.1, 5, 0.7, 10.0, 1.01, True, kernel)
    torch.library.opcheck(getattr(torch.ops.pyquant, op).default, args)
    codes, scales, zeros, err, iters = getattr(torch.ops.pyquant, op)(*args)
    assert codes.shape == (5, 70) and scales.shape == zeros.shape == err.shape == iters.shape == (5, 3)


@pytest.mark.parametrize("kernel", CPU_OR_REF)
def test_kquant_quantize_opcheck(kernel):
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    torch.library.opcheck(torch.ops.pyquant.kquant_quantize.default, (x, "Q4_K", None, kernel))
    blocks = torch.ops.pyquant.kquant_quantize(x, "Q4_K", None, kernel)
    assert blocks.shape == (3, GGUF("Q4_K").block.type_size)


def test_every_op_has_a_reference_kernel_and_is_listed_by_env():
    listed = pyquant.env()["kernels"]
    for op in dispatch.OPS:
        names = [k.name for k in dispatch.kernels(op)]
        assert any(n.startswith("reference_") for n in names), op
        for k in dispatch.kernels(op):
            assert k.name.startswith(f"{k.backend}_{k.format}_{op}"), k.name  # <backend>_<format>_<op>[_<path>]
            assert k.name in listed[f"{op}/{k.backend}"]


@pytest.mark.parametrize("call", [
    lambda k: pyquant.ops.kquant_quantize(torch.randn(2, 256), GGUF("Q6_K"), kernel=k),
    lambda k: pyquant.ops.hqq_solve(torch.randn(2, 64), 4, 32, torch.float16, iters=2, lp_norm=0.7, beta=10.0,
                                    kappa=1.01, early_stop=True, kernel=k),
    lambda k: pyquant.qmatmul(torch.randn(2, 64), pyquant.quantize_weight(torch.randn(8, 64), Int(4, 32)), kernel=k),
])
def test_kernel_override_is_the_same_on_every_op(call):
    with pytest.raises(pyquant.KernelUnavailableError, match="'bogus'"):
        call("bogus")
    with pytest.raises(pyquant.KernelUnavailableError, match="cuda"):  # CPU tensors
        call("cuda")
    with pytest.raises(pyquant.FormatError, match="kernel must be a string"):
        call(3)
