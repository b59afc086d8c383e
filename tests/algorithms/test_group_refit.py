"""The least-squares group-parameter refit (pyquant.algorithms.group_refit)."""
import pytest
import torch

from pyquant.algorithms.gptq import gptq_quantize
from pyquant.algorithms.group_refit import refit_group_params
from pyquant.errors import ShapeError, ValueRangeError
from pyquant.formats import Int

from tests.algorithms.test_gptq import correlated_hessian


def damped(H, damp):
    Hd = H.clone()
    Hd.diagonal().add_(damp * H.diagonal().mean())
    return Hd


def dequant(codes, s, z, g):
    idx = torch.arange(codes.shape[1]) // g
    return (codes.float() - z[:, idx]) * s[:, idx]


def row_errors(W, dq, Hd):
    d = (dq - W).double()
    return ((d @ Hd.double()) * d).sum(1)


def reference_refit(W, Hd, codes, zeros, g, free_zero):
    """Spec: each row's dense basis (k x unknowns) and a float64 normal-equation solve."""
    n, k = W.shape
    ng = -(-k // g)
    idx = torch.arange(k) // g
    out_s, out_z = [], []
    for r in range(n):
        q = codes[r].double()
        onehot = torch.nn.functional.one_hot(idx, ng).double()  # (k, G)
        if free_zero:
            B = torch.cat([onehot * q[:, None], onehot], 1)  # dq = B @ [alpha; beta]
        else:
            B = onehot * (q - zeros[r].double()[idx])[:, None]
        theta = torch.linalg.solve(B.T @ Hd.double() @ B, B.T @ Hd.double() @ W[r].double())
        if free_zero:
            out_s.append(theta[:ng])
            out_z.append(-theta[ng:] / theta[:ng])
        else:
            out_s.append(theta)
            out_z.append(zeros[r].double())
    return torch.stack(out_s).float(), torch.stack(out_z).float()


def case(n=24, k=200, seed=0):
    H, _ = correlated_hessian(k, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(n, k, generator=g) * 0.05, H


@pytest.mark.parametrize("mode", ["scale", "scale_zero"])
@pytest.mark.parametrize("fmt", [Int(4, 64, scale_dtype=torch.float32), Int(3, 32, scale_dtype=torch.float32),
                                 Int(4, 64, True, torch.float32)], ids=str)
def test_matches_the_dense_least_squares_spec(fmt, mode):
    W, H = case()  # k = 200: the last group of 64 is ragged (8 columns)
    res = gptq_quantize(W, H, fmt, damp=0.05, clip="mse")
    codes, s0, z0 = fmt.unpack(res.qweight)
    s, z, changed = refit_group_params(W, H, codes, s0, z0, fmt, damp=0.05, mode=mode)
    assert changed == W.shape[0]  # on this weight every row improves
    s_ref, z_ref = reference_refit(W, damped(H, 0.05), codes, z0, fmt.group_size_for(200),
                                   mode == "scale_zero" and not fmt.symmetric)
    torch.testing.assert_close(s, s_ref, rtol=2e-3, atol=1e-7)
    torch.testing.assert_close(z, z_ref, rtol=2e-3, atol=2e-3)
    if mode == "scale" or fmt.symmetric:
        assert torch.equal(z, z0)  # integer zero points are kept


@pytest.mark.parametrize("mode", ["scale", "scale_zero"])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_no_row_gets_worse_and_stored_params_are_what_was_judged(mode, scale_dtype):
    fmt = Int(4, 64, scale_dtype=scale_dtype)
    W, H = case(seed=3)
    W[0] = 0.0  # every group's codes equal: (q, 1) collinear, the ridge keeps the solve finite
    W[1, :64] = 0.02  # one constant group
    res = gptq_quantize(W, H, fmt, damp=0.05)
    codes, s0, z0 = fmt.unpack(res.qweight)
    s, z, _ = refit_group_params(W, H, codes, s0, z0, fmt, damp=0.05, mode=mode)
    assert torch.equal(s, s.to(scale_dtype).float()) and torch.equal(z, z.to(scale_dtype).float())
    assert torch.isfinite(s).all() and torch.isfinite(z).all() and (s > 0).all()
    Hd = damped(H, 0.05)
    before = row_errors(W, dequant(codes, s0, z0, 64), Hd)
    after = row_errors(W, dequant(codes, s, z, 64), Hd)
    assert (after <= before).all()
    assert after[2:].sum() < 0.99 * before[2:].sum()  # and it does help (bf16 rounding keeps a little of it)


@pytest.mark.parametrize("order,act_order", [("natural", False), ("natural", True), ("hessian", False)])
@pytest.mark.parametrize("mode", ["scale", "scale_zero"])
def test_gptq_refit_keeps_codes_and_lowers_the_output_error(order, act_order, mode):
    fmt = Int(4, 64, act_order=act_order)
    W, H = case(n=32, k=256, seed=5)
    base = gptq_quantize(W, H, fmt, damp=0.01, order=order, clip="mse")
    res = gptq_quantize(W, H, fmt, damp=0.01, order=order, clip="mse", refit=mode)
    assert torch.equal(fmt.unpack(base.qweight)[0], fmt.unpack(res.qweight)[0])
    if act_order:
        assert torch.equal(base.qweight.tensors["perm"], res.qweight.tensors["perm"])
    assert res.refit_rows > 0 and res.loss == base.loss

    def err(qw):
        d = qw.dequantize().float() - W
        return float(((d @ H) * d).sum())

    assert err(res.qweight) < (0.98 if mode == "scale_zero" else 0.995) * err(base.qweight)
    zeros = fmt.unpack(res.qweight)[2]
    assert torch.equal(zeros, zeros.round()) == (mode == "scale")


def test_bad_input():
    fmt = Int(4, 64)
    W, H = case(n=4, k=128)
    codes = torch.zeros((4, 128), dtype=torch.uint8)
    s = torch.ones(4, 2)
    with pytest.raises(ValueRangeError, match="refit mode"):
        refit_group_params(W, H, codes, s, s, fmt, damp=0.1, mode="zero")
    with pytest.raises(ShapeError, match=r"scales \(4, 3\)"):
        refit_group_params(W, H, codes, torch.ones(4, 3), s, fmt, damp=0.1)
    with pytest.raises(ValueRangeError, match="refit"):
        gptq_quantize(W, H, fmt, refit="yes")


@pytest.mark.gpu
def test_cuda_tensors_match_the_cpu_result():
    fmt = Int(4, 64)
    W, H = case(n=64, k=200, seed=7)
    res = gptq_quantize(W, H, fmt, damp=0.05)
    codes, s0, z0 = fmt.unpack(res.qweight)
    s, z, n_cpu = refit_group_params(W, H, codes, s0, z0, fmt, damp=0.05)
    sc, zc, n_gpu = refit_group_params(*(t.cuda() for t in (W, H, codes, s0, z0)), fmt, damp=0.05)
    assert sc.is_cuda and n_gpu == n_cpu
    # fp16-rounded parameters from fp32 sums in another order: at most one fp16 step apart
    torch.testing.assert_close(sc.cpu(), s, rtol=2e-3, atol=0)
    torch.testing.assert_close(zc.cpu(), z, rtol=2e-3, atol=2e-3)
