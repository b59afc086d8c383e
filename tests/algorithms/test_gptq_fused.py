"""The fused GPTQ in-block update (Triton, CUDA) against the pure-torch spec.

Without CUDA the Triton kernel runs under Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1 is set before the kernel module is first imported); with
CUDA the same tests run compiled on the GPU, and the CUDA tests (marked gpu)
run too. The comparisons are made on the same device as the reference.

Kernel names (benchmarks/verified.py): tests named test_<kernel>_... decide
whether that kernel is verified on a GPU.
"""
import os

import pytest

from tests.deps import require
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from pyquant import _ext  # noqa: E402
from pyquant.algorithms import gptq as gptq_mod  # noqa: E402
from pyquant.algorithms.gptq import (  # noqa: E402
    gptq_block_update,
    gptq_block_update_reference,
    gptq_quantize,
    inverse_hessian_factor,
)
from pyquant.errors import KernelUnavailableError, ShapeError, ValueRangeError  # noqa: E402
from pyquant.formats import Int  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def cuda_ext_or_skip():
    ext = _ext.load()
    if ext is None or not ext.cuda_compiled():
        pytest.skip("pyquant._C was built without CUDA")
    return ext


def hinv_factor(b, seed):
    """Upper Cholesky factor of the inverse of a damped, correlated SPD matrix
    (what gptq_quantize hands the update): a well-conditioned update."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * b, b, generator=g) @ (torch.randn(b, b, generator=g) / b**0.5 + torch.eye(b))
    x = x * (torch.rand(b, generator=g) * 3 + 0.1)
    U, _, _ = inverse_hessian_factor(2 * x.T @ x / x.shape[0], 0.01)
    return U


def make_case(n, b, start, stop, group_len, maxq, seed=0):
    """W, Hinv, and per-(row, group) scale/zero from the groups' ranges (a few
    shrunk so that clamping happens)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, b, generator=g) * 0.05
    U = hinv_factor(b, seed + 1)
    ng = -(-(stop - start) // group_len)
    scale = torch.empty(n, ng)
    zero = torch.empty(n, ng)
    for j in range(ng):
        c0, c1 = start + j * group_len, min(start + (j + 1) * group_len, stop)
        lo = W[:, c0:c1].amin(1).clamp(max=0)
        hi = W[:, c0:c1].amax(1).clamp(min=0)
        s = (hi - lo) / maxq * (torch.rand(n, generator=g) * 0.5 + 0.75)
        scale[:, j] = s
        zero[:, j] = torch.round(-lo / s).clamp(0, maxq)
    return W, U, scale, zero


def run(kernel, W, U, scale, zero, start, stop, group_len, maxq, device=DEVICE, strided=False):
    """Runs one kernel on copies (on ``device``); codes/errors go to column
    slices of wider buffers when ``strided`` (as gptq_quantize passes them)."""
    n = W.shape[0]
    cnt = stop - start
    W = W.to(device).clone()
    pad = 3 if strided else 0
    codes_buf = torch.full((n, cnt + 2 * pad), 7, dtype=torch.uint8, device=device)
    err_buf = torch.full((n, cnt + 2 * pad), 7.0, device=device)
    codes, err = codes_buf[:, pad : pad + cnt], err_buf[:, pad : pad + cnt]
    args = (W, U.to(device), scale.to(device), zero.to(device), start, stop, group_len, maxq, codes, err)
    if kernel == "triton_block_n":
        gptq_mod._triton_gptq().gptq_block_update(*args, block_n=4)
    else:
        gptq_block_update(*args, kernel=kernel)
    if strided:  # the padding is untouched
        assert bool((codes_buf[:, :pad] == 7).all() and (codes_buf[:, pad + cnt :] == 7).all())
        assert bool((err_buf[:, :pad] == 7).all() and (err_buf[:, pad + cnt :] == 7).all())
    return W.cpu(), codes.cpu(), err.cpu()


def assert_update_close(ref, got, U, scale, zero, start, group_len, what):
    """Codes equal except at rounding ties that a last-bit difference of the
    updated weight may flip (then the row diverges from there on, as GPTQ's
    error feedback makes it); W and the errors of the rows with equal codes
    within 1e-5 relative."""
    (wr, cr, er), (wg, cg, eg) = ref, got
    neq = cr != cg
    equal_frac = 1.0 - float(neq.float().mean())
    bad_rows = neq.any(1).nonzero().flatten().tolist()
    for r in bad_rows:
        c = int(neq[r].nonzero()[0])
        i = start + c
        gidx = c // group_len
        s, z, d = float(scale[r, gidx]), float(zero[r, gidx]), float(U[i, i])
        # the reference's updated weight, from its code and error, in units of s
        x = float(er[r, c]) * d / s + (int(cr[r, c]) - z)
        tie = abs(abs(x - int(x)) - 0.5) if x == x else 1.0
        assert abs(int(cr[r, c]) - int(cg[r, c])) == 1 and tie < 1e-3, (
            f"{what}: row {r} column {i}: code {int(cg[r, c])} vs reference {int(cr[r, c])} is no rounding tie "
            f"(w/s - z = {x})"
        )
        torch.testing.assert_close(eg[r, :c], er[r, :c], rtol=1e-5, atol=1e-5 * float(er.abs().max()) + 1e-12)
    assert equal_frac >= 0.999 or len(bad_rows) <= max(1, wr.shape[0] // 100), (
        f"{what}: codes equal in only {equal_frac:.4%} of entries ({len(bad_rows)} rows differ)"
    )
    same = torch.ones(wr.shape[0], dtype=torch.bool)
    same[bad_rows] = False
    wmax = float(wr.abs().max())
    torch.testing.assert_close(wg[same], wr[same], rtol=1e-5, atol=1e-5 * wmax, msg=lambda m: f"{what}: W {m}")
    torch.testing.assert_close(eg[same], er[same], rtol=1e-5, atol=1e-5 * float(er.abs().max()) + 1e-12,
                               msg=lambda m: f"{what}: errors {m}")


# (n, b, start, stop, group_len, maxq): ragged row counts, B not a power of
# two, sub-ranges, a last group shorter than group_len.
CASES = [
    (1, 16, 0, 16, 16, 15),
    (5, 72, 0, 72, 24, 7),
    (33, 72, 8, 61, 20, 3),
    (33, 128, 0, 128, 128, 255),
    (5, 100, 40, 100, 32, 15),
    (33, 16, 3, 13, 4, 255),
    (1, 128, 64, 128, 64, 3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}-b{}-{}:{}-g{}-q{}".format(*c))
def test_triton_gptq_block_update_matches_reference(case):
    require("triton")
    n, b, start, stop, gl, maxq = case
    W, U, scale, zero = make_case(n, b, start, stop, gl, maxq, seed=n + b)
    ref = run("reference", W, U, scale, zero, start, stop, gl, maxq)
    got = run("triton", W, U, scale, zero, start, stop, gl, maxq, strided=True)
    assert_update_close(ref, got, U, scale, zero, start, gl, f"triton {case}")


@pytest.mark.parametrize("case", [(5, 72, 0, 72, 24, 7), (9, 100, 8, 90, 20, 15)], ids=str)
def test_triton_gptq_block_update_several_programs(case):
    """Four rows per program: ragged last program, rows split over programs."""
    require("triton")
    n, b, start, stop, gl, maxq = case
    W, U, scale, zero = make_case(n, b, start, stop, gl, maxq, seed=3)
    ref = run("reference", W, U, scale, zero, start, stop, gl, maxq)
    got = run("triton_block_n", W, U, scale, zero, start, stop, gl, maxq, strided=True)
    assert_update_close(ref, got, U, scale, zero, start, gl, f"triton block_n=4 {case}")


def correlated_hessian(k, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k))
    x = x * (torch.rand(k, generator=g) * 3 + 0.1)
    return 2 * x.T @ x / n


def assert_quantize_agrees(kernel, fmt, n, k, seed, **kw):
    H = correlated_hessian(k, 4 * k, seed)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1)) * 0.05
    a = gptq_quantize(w.to(DEVICE), H.to(DEVICE), fmt, kernel="reference", **kw)
    b = gptq_quantize(w.to(DEVICE), H.to(DEVICE), fmt, kernel=kernel, **kw)
    assert abs(a.loss - b.loss) <= 1e-4 * a.loss, f"{kernel} {fmt.spec()}: loss {b.loss} vs reference {a.loss}"
    ca = a.qweight.dequantize(torch.float32).cpu()
    cb = b.qweight.dequantize(torch.float32).cpu()
    assert float((ca != cb).float().mean()) <= 1e-3


@pytest.mark.parametrize("fmt,kw", [(Int(4, 64), {}), (Int(3, -1, True), {}), (Int(4, 32), {"static_groups": True})],
                         ids=["int4-g64", "int3-sym-channel", "int4-g32-static"])
def test_triton_gptq_block_update_end_to_end(fmt, kw):
    require("triton")
    assert_quantize_agrees("triton", fmt, 16, 192, seed=7, **kw)


def test_gptq_block_update_kernel_choice(monkeypatch):
    W, U, scale, zero = make_case(4, 16, 0, 16, 16, 15)
    codes = torch.empty(4, 16, dtype=torch.uint8)
    err = torch.empty(4, 16)
    with pytest.raises(KernelUnavailableError):
        gptq_block_update(W.clone(), U, scale, zero, 0, 16, 16, 15, codes, err, kernel="bogus")
    with pytest.raises(KernelUnavailableError):  # CPU tensors
        gptq_block_update(W.clone(), U, scale, zero, 0, 16, 16, 15, codes, err, kernel="cuda")
    with pytest.raises(KernelUnavailableError):
        gptq_quantize(torch.randn(4, 32), torch.eye(32), Int(4, 32), kernel="cuda")
    # auto on the CPU is unchanged: never a GPU kernel, even if listed as verified
    monkeypatch.setattr("pyquant.ops.dispatch.verified_kernels",
                        lambda: frozenset({gptq_mod.TRITON_NAME, gptq_mod.CUDA_NAME}))
    monkeypatch.setattr(gptq_mod, "_triton_gptq", lambda: pytest.fail("auto chose Triton on the CPU"))
    gptq_block_update(W.clone(), U, scale, zero, 0, 16, 16, 15, codes, err)


def test_triton_gptq_block_update_bad_input():
    require("triton")
    W, U, scale, zero = make_case(4, 16, 0, 16, 8, 15)
    W, U, scale, zero = (t.to(DEVICE) for t in (W, U, scale, zero))
    codes = torch.empty(4, 16, dtype=torch.uint8, device=DEVICE)
    err = torch.empty(4, 16, device=DEVICE)

    def call(**over):
        a = dict(W=W.clone(), Hinv=U, scale=scale, zero=zero, start=0, stop=16, group_len=8, maxq=15,
                 codes_out=codes, err_out=err)
        a.update(over)
        gptq_block_update(**a, kernel="triton")

    with pytest.raises(ShapeError):
        call(W=W.t().contiguous().t())  # column stride != 1
    with pytest.raises(ShapeError):
        call(Hinv=U[:, :15])
    with pytest.raises(ShapeError):
        call(scale=scale[:, :1])
    with pytest.raises(ShapeError):
        call(codes_out=codes.float())
    with pytest.raises(ShapeError):
        call(W=W.double())
    with pytest.raises(ShapeError):
        call(stop=17)
    with pytest.raises(ValueRangeError):
        call(maxq=256)
    with pytest.raises(ValueRangeError):
        call(group_len=0)


# ------------------------------------------------------------------ CUDA ---
GPU_CASES = CASES + [
    (1000, 128, 0, 128, 128, 15),  # many CTAs, N not a multiple of the 16 rows of a CTA
    (1000, 128, 32, 96, 32, 7),
    (257, 256, 0, 256, 64, 15),
    (99, 33, 0, 33, 8, 255),  # two register slots, the second one nearly empty
    (70, 300, 10, 290, 128, 3),  # the 16-slot variant, partly filled
    (18, 512, 0, 512, 512, 15),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernel", ["cuda", "triton"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "n{}-b{}-{}:{}-g{}-q{}".format(*c))
def test_cuda_gptq_block_update_matches_reference(case, kernel):
    if kernel == "cuda":
        cuda_ext_or_skip()
    else:
        require("triton")
    n, b, start, stop, gl, maxq = case
    W, U, scale, zero = make_case(n, b, start, stop, gl, maxq, seed=n + b)
    ref = run("reference", W, U, scale, zero, start, stop, gl, maxq, device="cuda")
    got = run(kernel, W, U, scale, zero, start, stop, gl, maxq, device="cuda", strided=True)
    assert_update_close(ref, got, U, scale, zero, start, gl, f"{kernel} {case}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt,kw", [(Int(4, 128), {}), (Int(3, -1, True), {}), (Int(4, 64), {"static_groups": True}),
                                    (Int(8, 128, act_order=True), {})],
                         ids=["int4-g128", "int3-sym-channel", "int4-g64-static", "int8-g128-actorder"])
def test_cuda_gptq_block_update_end_to_end(fmt, kw):
    cuda_ext_or_skip()
    assert_quantize_agrees("cuda", fmt, 256, 512, seed=11, **kw)
    assert_quantize_agrees("triton", fmt, 256, 512, seed=11, **kw)


@pytest.mark.gpu
@needs_cuda
def test_cuda_gptq_block_update_dispatch_and_bad_input(monkeypatch):
    cuda_ext_or_skip()
    W, U, scale, zero = (t.cuda() for t in make_case(64, 128, 0, 128, 64, 15))
    codes = torch.empty(64, 128, dtype=torch.uint8, device="cuda")
    err = torch.empty(64, 128, device="cuda")
    calls = []
    monkeypatch.setattr(gptq_mod, "_update_cuda", lambda *a: calls.append("cuda"))
    monkeypatch.setattr(gptq_mod, "_triton_gptq", lambda: calls.append("triton") or pytest.fail("triton"))
    # unverified: auto on the GPU is the reference (DESIGN rule 6)
    monkeypatch.setattr("pyquant.ops.dispatch.verified_kernels", lambda: frozenset())
    gptq_block_update(W.clone(), U, scale, zero, 0, 128, 64, 15, codes, err)
    assert calls == []
    monkeypatch.setattr("pyquant.ops.dispatch.verified_kernels", lambda: frozenset({gptq_mod.CUDA_NAME}))
    gptq_block_update(W.clone(), U, scale, zero, 0, 128, 64, 15, codes, err)
    assert calls == ["cuda"]
    monkeypatch.undo()
    with pytest.raises(KernelUnavailableError):  # wider than the kernel's registers
        wide = torch.zeros(4, 520, device="cuda")
        gptq_block_update(wide, torch.eye(520, device="cuda"), scale[:4], zero[:4], 0, 520, 520, 15,
                          torch.empty(4, 520, dtype=torch.uint8, device="cuda"), torch.empty(4, 520, device="cuda"),
                          kernel="cuda")
    with pytest.raises(ShapeError):  # a CPU tensor among CUDA ones
        gptq_block_update(W.clone(), U.cpu(), scale, zero, 0, 128, 64, 15, codes, err, kernel="cuda")
    with pytest.raises(ShapeError):
        gptq_block_update(W.clone(), U, scale, zero, 0, 128, 64, 15, codes, err[:, :100], kernel="cuda")
