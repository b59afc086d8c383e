import pytest
import torch

from pyquant import _ext
from pyquant.algorithms.gptq import gptq_quantize, inverse_hessian_factor
from pyquant.algorithms.hessian import HessianAccumulator
from pyquant.ops.primitives import group_params, pad_groups
from pyquant.algorithms.rtn import int_scales_zeros, rtn
from pyquant.errors import FormatError, KernelUnavailableError, ShapeError, ValueRangeError
from pyquant.formats import NF4, Int
from pyquant.ops import gptq_block_update
from pyquant.ops.reference.gptq import gptq_block_update_reference

EXT = _ext.load()
HAS_CPU = EXT is not None and hasattr(EXT, "gptq_block_update_f32")
KERNELS = ["reference"] + (["cpu"] if HAS_CPU else [])


@pytest.fixture(params=["scalar", "best"] if HAS_CPU else ["none"])
def simd(request):
    if request.param == "none":
        yield request.param
        return
    EXT.set_simd_level(request.param)
    yield request.param
    EXT.set_simd_level("best")


def correlated_hessian(k, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(k, generator=g) * 3 + 0.1
    x = (torch.randn(n, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k))) * scales
    acc = HessianAccumulator(k)
    acc.add(x)
    return acc.hessian(), x


def output_error(w, dq, H):
    d = dq - w
    return float(((d @ H) * d).sum() / ((w @ H) * w).sum())


def test_the_cpu_kernel_is_built():
    # The compiled path is part of the build; a missing symbol is a build bug.
    assert HAS_CPU


FORMATS = [
    Int(4, 64),
    Int(4, 128, True),
    Int(3, 32),
    Int(3, -1, True),
    Int(2, 64),
    Int(8, 128),
    Int(4, 64, False, torch.bfloat16),
    Int(4, 256, False, torch.float32),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.spec())
@pytest.mark.parametrize("kernel,level", [("reference", None), ("cpu", "scalar"), ("cpu", "best")])
def test_identity_hessian_reproduces_rtn_exactly(fmt, kernel, level):
    if level is not None:
        assert EXT.set_simd_level(level)
    torch.manual_seed(1)
    k = 200  # ragged last group for every group size but -1
    w = torch.randn(24, k) * torch.rand(24, 1)
    try:
        res = gptq_quantize(w, torch.eye(k), fmt, kernel=kernel, clip=None)
    finally:
        if EXT is not None:
            EXT.set_simd_level("best")
    ref = rtn(w, fmt)
    for name, t in ref.tensors.items():
        assert torch.equal(res.qweight.tensors[name], t), name


def test_group_params_is_rtns_rule():
    torch.manual_seed(0)
    for fmt in FORMATS:
        w = torch.randn(7, 100) * 3
        codes, scale, zero = int_scales_zeros(w, fmt)
        s, z = group_params(pad_groups(w, fmt.group_size_for(100)), fmt)
        assert torch.equal(s, scale)
        if zero is not None:
            assert torch.equal(z, zero)


@pytest.mark.parametrize("start,stop,group_len", [(0, 96, 32), (32, 64, 32), (0, 96, 96), (5, 77, 24)])
def test_cpu_block_update_matches_reference(start, stop, group_len, simd):
    if not HAS_CPU:
        pytest.fail("compiled kernel missing")
    torch.manual_seed(2)
    n, b = 37, 96  # row count not a multiple of the 8-row tile
    H, _ = correlated_hessian(b, seed=3)
    U, _, _ = inverse_hessian_factor(H, 0.01)
    w0 = torch.randn(n, b)
    ng = -(-(stop - start) // group_len)
    scale = (torch.rand(n, ng) * 0.2 + 0.05)
    zero = torch.randint(0, 16, (n, ng)).float()
    outs = []
    for kern in ("reference", "cpu"):
        W = w0.clone()
        codes = torch.zeros(n, stop - start, dtype=torch.uint8)
        err = torch.zeros(n, stop - start)
        gptq_block_update(W, U, scale, zero, start, stop, group_len, 15, codes, err, kernel=kern)
        outs.append((W, codes, err))
    (wr, cr, er), (wc, cc, ec) = outs
    mismatch = float((cr != cc).float().mean())
    assert mismatch < 2e-3, f"codes differ in {mismatch:.2%} of entries"
    rows_same = (cr == cc).all(1)
    torch.testing.assert_close(wc[rows_same], wr[rows_same], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ec[rows_same], er[rows_same], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", [Int(4, 64), Int(3, 128, True), Int(4, -1)], ids=lambda f: f.spec())
def test_cpu_path_agrees_with_reference_end_to_end(fmt, simd):
    torch.manual_seed(4)
    k = 320
    H, _ = correlated_hessian(k, seed=5)
    w = torch.randn(48, k) * 0.05
    a = gptq_quantize(w, H, fmt, kernel="reference")
    b = gptq_quantize(w, H, fmt, kernel="cpu")
    ca, cb = a.qweight.dequantize(torch.float32), b.qweight.dequantize(torch.float32)
    assert float((ca != cb).float().mean()) < 2e-3
    ea, eb = output_error(w, ca, H), output_error(w, cb, H)
    assert abs(ea - eb) <= 0.01 * ea
    assert abs(a.loss - b.loss) <= 0.01 * a.loss


@pytest.mark.parametrize("fmt", [Int(4, 64), Int(3, 32, True), Int(4, -1)], ids=lambda f: f.spec())
@pytest.mark.parametrize("clip", [None, "mse", "hessian"])
def test_gptq_beats_rtn_on_output_error(fmt, clip):
    torch.manual_seed(6)
    k = 256
    H, _ = correlated_hessian(k, seed=7)
    w = torch.randn(64, k) * 0.05
    res = gptq_quantize(w, H, fmt, clip=clip)
    e_gptq = output_error(w, res.qweight.dequantize(torch.float32), H)
    e_rtn = output_error(w, rtn(w, fmt).dequantize(torch.float32), H)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_act_order_stores_the_permutation():
    torch.manual_seed(8)
    k = 192
    H, _ = correlated_hessian(k, seed=9)
    w = torch.randn(32, k) * 0.05
    fmt = Int(4, 64, act_order=True)
    res = gptq_quantize(w, H, fmt)
    perm = res.qweight.tensors["perm"].long()
    assert torch.equal(perm.sort().values, torch.arange(k))
    assert torch.equal(perm, torch.argsort(H.diagonal(), descending=True, stable=True))
    dq = res.qweight.dequantize(torch.float32)  # logical column order
    plain = gptq_quantize(w, H, Int(4, 64)).qweight.dequantize(torch.float32)
    assert output_error(w, dq, H) < 1.5 * output_error(w, plain, H)
    # RTN with the identity Hessian, act-order or not, is the same weight up to the column order.
    res_i = gptq_quantize(w, torch.diag(torch.arange(k, 0, -1).float()), Int(4, 64, act_order=True), clip=None)
    assert torch.equal(res_i.qweight.tensors["perm"].long(), torch.arange(k))


@pytest.mark.parametrize("clip", [None, "mse"])
def test_hessian_order_keeps_groups_and_layout(clip):
    """order="hessian" (llm-compressor's static act-order): processing order by
    diag(H), original groups, plain layout, static group parameters."""
    k = 200  # ragged last group
    H, _ = correlated_hessian(k, seed=12)
    w = torch.randn(24, k, generator=torch.Generator().manual_seed(13)) * 0.05
    fmt = Int(3, 64)
    res = gptq_quantize(w, H, fmt, order="hessian", clip=clip)
    assert "perm" not in res.qweight.tensors
    static = gptq_quantize(w, H, fmt, static_groups=True, clip=clip)
    # the same group parameters as static groups (computed before any update) ...
    assert torch.equal(res.qweight.tensors["scales"], static.qweight.tensors["scales"])
    assert torch.equal(res.qweight.tensors["zeros"], static.qweight.tensors["zeros"])
    # ... a different solution (another column order) that still beats RTN on the output error
    dq = res.qweight.dequantize(torch.float32)
    assert not torch.equal(dq, static.qweight.dequantize(torch.float32))
    assert output_error(w, dq, H) < output_error(w, rtn(w, fmt).dequantize(torch.float32), H)
    # With diag(H) already decreasing, the order is the natural one: the same result.
    d = torch.linspace(4.0, 1.0, k)
    s = (d / H.diagonal()).sqrt()
    H_sorted = H * s[:, None] * s[None, :]
    a = gptq_quantize(w, H_sorted, fmt, order="hessian", clip=clip)
    b = gptq_quantize(w, H_sorted, fmt, static_groups=True, clip=clip)
    assert torch.equal(a.qweight.dequantize(), b.qweight.dequantize())
    # The identity Hessian gives RTN in any order.
    c = gptq_quantize(w, torch.eye(k), fmt, order="hessian", clip=None)
    assert torch.equal(c.qweight.dequantize(), rtn(w, fmt).dequantize())
    with pytest.raises(FormatError, match="act_order"):
        gptq_quantize(w, H, Int(3, 64, act_order=True), order="hessian")
    with pytest.raises(ValueRangeError, match="order"):
        gptq_quantize(w, H, fmt, order="random")


def test_static_groups_use_the_unmodified_weights():
    torch.manual_seed(10)
    k = 128
    H, _ = correlated_hessian(k, seed=11)
    w = torch.randn(16, k) * 0.05
    fmt = Int(4, 32)
    res = gptq_quantize(w, H, fmt, static_groups=True, clip=None)
    _, scale, zero = int_scales_zeros(w, fmt)
    assert torch.equal(res.qweight.tensors["scales"], scale.to(torch.float16))
    assert torch.equal(res.qweight.tensors["zeros"], zero.to(torch.float16))


def test_mse_clip_never_worse_than_rtn_on_weight_error():
    torch.manual_seed(12)
    w = torch.randn(32, 256)
    w[:, 7] *= 8  # an outlier column makes clipping worthwhile
    fmt = Int(3, 64)
    clipped = gptq_quantize(w, torch.eye(256), fmt, clip="mse").qweight.dequantize(torch.float32)
    plain = rtn(w, fmt).dequantize(torch.float32)
    assert float(((clipped - w) ** 2).sum()) < float(((plain - w) ** 2).sum())


def test_dead_inputs_are_kept_and_rounded():
    torch.manual_seed(13)
    k = 96
    H, _ = correlated_hessian(k, seed=14)
    dead = torch.tensor([3, 40, 95])
    H[dead, :] = 0
    H[:, dead] = 0
    w = torch.randn(8, k)
    res = gptq_quantize(w, H, Int(4, 32), clip=None)
    assert res.dead_columns == 3
    dq = res.qweight.dequantize(torch.float32)
    assert torch.isfinite(dq).all()
    assert float(dq[:, dead].abs().sum()) > 0  # not zeroed (the textbook code would zero them)
    assert float((dq[:, dead] - w[:, dead]).abs().max()) < 0.6  # within a rounding step


def test_all_zero_hessian_is_rtn():
    w = torch.randn(8, 64)
    res = gptq_quantize(w, torch.zeros(64, 64), Int(4, 32), clip=None)
    assert res.dead_columns == 64
    assert torch.equal(res.qweight.tensors["qweight"], rtn(w, Int(4, 32)).tensors["qweight"])


def test_cholesky_failure_raises_damping():
    k = 64
    H = torch.eye(k)
    H[0, 1] = H[1, 0] = 2.0  # indefinite: eigenvalue -1
    res = gptq_quantize(torch.randn(8, k), H, Int(4, 32), damp=0.01)
    assert res.damp_retries > 0 and res.damp > 0.01
    assert torch.isfinite(res.qweight.dequantize(torch.float32)).all()


def test_inverse_factor_matches_textbook():
    H, _ = correlated_hessian(80, seed=15)
    U, d, r = inverse_hessian_factor(H, 0.01)
    Hd = H.clone()
    Hd.diagonal().add_(0.01 * H.diagonal().mean())
    U0 = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    torch.testing.assert_close(U, U0, rtol=1e-3, atol=1e-4)
    assert r == 0 and d == 0.01


def test_hessian_accumulator():
    torch.manual_seed(16)
    xs = [torch.randn(3, 5, 12), torch.randn(7, 12)]
    acc = HessianAccumulator(12, abs_mean=True)
    for x in xs:
        acc.add(x)
    x = torch.cat([xs[0].reshape(-1, 12), xs[1]])
    torch.testing.assert_close(acc.hessian(), 2 / x.shape[0] * x.T @ x)
    torch.testing.assert_close(acc.abs_mean(), x.abs().mean(0))
    assert acc.n_tokens == 22
    bad = torch.randn(4, 12)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueRangeError, match="NaN"):
        acc.add(bad)
    with pytest.raises(ShapeError):
        acc.add(torch.randn(4, 11))


def test_bad_input():
    w = torch.randn(8, 64)
    H = torch.eye(64)
    with pytest.raises(ShapeError):
        gptq_quantize(w, torch.eye(63), Int(4, 32))
    with pytest.raises(ShapeError):
        gptq_quantize(w[0], H, Int(4, 32))
    with pytest.raises(FormatError):
        gptq_quantize(w, H, NF4())
    wn = w.clone()
    wn[0, 0] = float("inf")
    with pytest.raises(ValueRangeError):
        gptq_quantize(wn, H, Int(4, 32))
    Hn = H.clone()
    Hn[1, 2] = float("nan")
    with pytest.raises(ValueRangeError):
        gptq_quantize(w, Hn, Int(4, 32))
    with pytest.raises(ValueRangeError):
        gptq_quantize(w, H, Int(4, 32), damp=0)
    with pytest.raises(ValueError):
        gptq_quantize(w, H, Int(4, 32), clip="bogus")
    with pytest.raises(KernelUnavailableError):
        gptq_quantize(w, H, Int(4, 32), kernel="cuda")


def test_block_update_reference_is_the_textbook_loop():
    # One column at a time, the reference equals GPTQ's published update rule.
    torch.manual_seed(17)
    n, b = 5, 16
    H, _ = correlated_hessian(b, seed=18)
    U, _, _ = inverse_hessian_factor(H, 0.01)
    W = torch.randn(n, b)
    scale = torch.full((n, 1), 0.1)
    zero = torch.full((n, 1), 8.0)
    W_ref = W.clone()
    codes = torch.zeros(n, b, dtype=torch.uint8)
    err = torch.zeros(n, b)
    gptq_block_update_reference(W, U, scale, zero, 0, b, b, 15, codes, err)
    for i in range(b):
        w = W_ref[:, i]
        q = torch.clamp(torch.round(w / 0.1) + 8, 0, 15)
        e = (w - (q - 8) * 0.1) / U[i, i]
        W_ref[:, i:] -= e.unsqueeze(1).matmul(U[i, i:].unsqueeze(0))
        assert torch.equal(codes[:, i], q.to(torch.uint8))
        torch.testing.assert_close(err[:, i], e)


@pytest.mark.parametrize("fmt", [Int(3, 32), Int(4, 64, True), Int(2, 32, False, torch.bfloat16)], ids=lambda f: f.spec())
@pytest.mark.parametrize("weighted", [False, True])
def test_shrink_search_matches_a_plain_search_over_group_params(fmt, weighted):
    from pyquant.ops.primitives import fake_quant, group_error, search_shrink

    torch.manual_seed(19)
    wg = pad_groups(torch.randn(16, 100) * torch.rand(16, 1) * 3, fmt.group_size)
    weight = torch.rand(wg.shape[1], wg.shape[2]) if weighted else None
    got = search_shrink(wg, fmt, grid=12, max_shrink=0.4, weight=weight)
    best_err, best = None, None
    for j in range(12):
        p = 1.0 - j * 0.4 / 12
        s, z = group_params(wg, fmt, torch.full(wg.shape[:-1], p))
        _, dq = fake_quant(wg, s.unsqueeze(-1), z.unsqueeze(-1), fmt.max_code)
        e = group_error(wg, dq, weight, 2.0)
        if best is None:
            best_err, best = e, torch.ones_like(e)
        else:
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            best = torch.where(better, torch.full_like(best, p), best)
    assert torch.equal(got, best)


@pytest.mark.skipif(EXT is None, reason="needs the compiled extension")
@pytest.mark.parametrize("bad", ["stop_past_block", "start_after_stop", "short_scales", "short_codes", "short_hinv"])
def test_cpu_block_update_checks_bounds_before_the_kernel(bad):
    # The C++ loop trusts start/stop/group_len and the output widths; a bad
    # call must be a ShapeError, never a read or write past a tensor.
    n, b, g = 4, 16, 8
    W, Hinv = torch.randn(n, b), torch.eye(b)
    scale, zero = torch.full((n, 2), 0.1), torch.full((n, 2), 8.0)
    codes, err = torch.empty(n, b, dtype=torch.uint8), torch.empty(n, b)
    start, stop = 0, b
    if bad == "stop_past_block":
        stop = b + 4
    elif bad == "start_after_stop":
        start, stop = 9, 4
    elif bad == "short_scales":
        scale, zero = scale[:, :1].contiguous(), zero[:, :1].contiguous()
    elif bad == "short_codes":
        codes = codes[:, :8]
    else:
        Hinv = Hinv[:8].contiguous()
    with pytest.raises(ShapeError):
        gptq_block_update(W, Hinv, scale, zero, start, stop, g, 15, codes, err, kernel="cpu")
