"""HQQ with float zero points (``zero_point="float"``, the hqq package's
formulation and the one the fused kernels solve): C++/Triton/CUDA solvers
against the pure-torch spec, against the hqq package and RTN on the same
weights, ragged groups, axis 0/1, bad input. The default integer-zero solver
is tested in test_hqq_integer_zero.py."""
# benchmarks/verified.py: a GPU run of this module decides whether the fused
# solvers may be chosen by default (every test here exercises both or neither).
GPU_KERNELS = ("cuda_int_hqq_solve", "triton_int_hqq_solve")
import contextlib
import functools
import math
import os
import subprocess
import sys
import textwrap

import pytest

from tests.deps import require
import torch

import pyquant
from pyquant import DtypeError, FormatError, KernelUnavailableError, ShapeError, ValueRangeError
from pyquant.algorithms import hqq as hqq_module
from pyquant.ops.reference.hqq import hqq_solve_reference
from pyquant.formats import NF4, Int

hqq_quantize = functools.partial(hqq_module.hqq_quantize, zero_point="float")
hqq_solve = functools.partial(hqq_module.hqq_solve, zero_point="float")

BITS = (2, 3, 4, 8)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def mixed_weight(n=24, k=300, seed=0):
    """Rows of very different character, so one weight exercises every branch:
    unit variance (shrinkage active: the pow() path), LLM-scale (shrinkage
    inactive, fixed points after a few steps), heavy tails, an outlier, an
    all-positive row, and degenerate groups (constant, all zero) where hqq's
    init is undefined and RTN's candidate takes over."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0:4] = torch.randn(4, k, generator=g)
    t = torch.distributions.StudentT(2.5).sample((4, k)) * 0.01
    w[4:8] = t
    w[8, 5] = 3.0
    w[9] = w[9].abs() + 0.5
    w[10] = 0.25
    w[11] = 0.0
    w[12, :40] = -0.125
    return w


@contextlib.contextmanager
def one_thread():
    """For the pure-torch reference and the hqq package on small tensors: on a
    busy 2-core machine, intra-op parallelism makes every tiny op wait for a
    descheduled worker (torch.round on 8K floats: 12 ms with 2 threads, 4 us
    with 1). The compiled kernels keep running with the suite's 2 threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def reference(w, bits, group, sdt, **kw):
    with one_thread():
        return hqq_solve_reference(w, bits, group, sdt, **kw)


def group_sq_err(w, w_hat, group):
    n, k = w.shape
    g = k if group == -1 else group
    ng = math.ceil(k / g)
    d = torch.zeros(n, ng * g, dtype=torch.float64)
    d[:, :k] = (w.double() - w_hat.double()) ** 2
    return d.view(n, ng, g).sum(-1)


def ext():
    e = pyquant._ext.load()
    if e is None or not hasattr(e, "hqq_solve_cpu"):
        pytest.fail("pyquant._C with hqq_solve_cpu is not built (build the extension first)")
    return e


def assert_close_solutions(ref, got, what):
    same = (ref.codes == got.codes).double().mean().item()
    er, eg = ref.err.double().sum().item(), got.err.double().sum().item()
    assert same >= 0.99, f"{what}: only {same:.4%} of codes agree with the reference"
    assert abs(er - eg) <= 1e-3 * er + 1e-12, f"{what}: total squared error {eg:.6g} vs reference {er:.6g}"


# ------------------------------------------------------------- C++ vs spec ---
@pytest.mark.parametrize("simd", ["best", "scalar"])
@pytest.mark.parametrize("sdt", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("bits", BITS)
def test_cpu_matches_reference(bits, group, sdt, simd):
    e = ext()
    w = mixed_weight()
    fmt = Int(bits, group, scale_dtype=sdt)
    ref = reference(w, bits, fmt.group_size_for(w.shape[1]), sdt)
    try:
        assert e.set_simd_level(simd)
        got = hqq_solve(w, fmt, kernel="cpu")
    finally:
        e.set_simd_level("best")
    assert_close_solutions(ref, got, f"cpu[{simd}] {fmt.spec()}")
    # groups that chose the same candidate and zero store identical scales
    same_z = got.zeros == ref.zeros
    assert torch.equal(got.scales[same_z], ref.scales[same_z])
    # the reported error is the error of what is stored
    qw = fmt.pack(got.codes, got.scales, got.zeros)
    actual = group_sq_err(w, qw.dequantize(), group)
    torch.testing.assert_close(got.err.double(), actual, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("kappa, lp_norm", [(1.01, 0.7), (1.0, 1.0), (1.05, 0.5)])
def test_cpu_matches_reference_other_schedules(kappa, lp_norm):
    ext()
    w = mixed_weight(seed=1)
    fmt = Int(3, 64)
    ref = reference(w, 3, 64, fmt.scale_dtype, kappa=kappa, lp_norm=lp_norm)
    got = hqq_solve(w, fmt, kappa=kappa, lp_norm=lp_norm, kernel="cpu")
    assert_close_solutions(ref, got, f"kappa={kappa} lp={lp_norm}")


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
@pytest.mark.parametrize("kappa", [1.0, 1.01])
def test_early_stop_is_lossless(kernel, kappa):
    """Groups stop only at a fixed point of the iteration, so stopping early
    changes the running time, never the result."""
    if kernel == "cpu":
        ext()
    w = mixed_weight(seed=2)
    fmt = Int(4, 32)
    with one_thread() if kernel == "reference" else contextlib.nullcontext():
        a = hqq_solve(w, fmt, kappa=kappa, early_stop=True, kernel=kernel)
        b = hqq_solve(w, fmt, kappa=kappa, early_stop=False, kernel=kernel)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.zeros, b.zeros) and torch.equal(a.scales, b.scales)
    assert a.iters.sum() < b.iters.sum() and int(b.iters.max()) == 20


def test_iters_zero_and_auto_dispatch():
    ext()
    w = mixed_weight(seed=3)
    fmt = Int(4, 64)
    with one_thread():
        ref = hqq_solve(w, fmt, iters=0, kernel="reference")
    got = hqq_solve(w, fmt, iters=0, kernel="cpu")
    assert int(got.iters.max()) == 0
    assert_close_solutions(ref, got, "iters=0")
    auto = hqq_quantize(w, fmt)
    cpu = hqq_quantize(w, fmt, kernel="cpu")
    assert all(torch.equal(auto.tensors[n], cpu.tensors[n]) for n in cpu.tensors)


@pytest.mark.parametrize("shape", [(3, 1), (5, 7), (2, 33), (4, 200), (1, 520)])
@pytest.mark.parametrize("group", [32, 256, -1])
def test_ragged_and_tiny_shapes(shape, group):
    ext()
    torch.manual_seed(sum(shape))
    w = torch.randn(*shape) * 0.05
    fmt = Int(4, group)
    ref = reference(w, 4, fmt.group_size_for(shape[1]), fmt.scale_dtype)
    got = hqq_solve(w, fmt, kernel="cpu")
    assert_close_solutions(ref, got, f"shape {shape} group {group}")
    qw = hqq_quantize(w, fmt)
    assert qw.shape == shape
    rtn = pyquant.quantize_weight(w, fmt).dequantize()
    assert (w - qw.dequantize()).norm() <= (w - rtn).norm() * (1 + 1e-6) + 1e-12


# ---------------------------------------------------------- Triton (interp) ---
TRITON_CASES = [(2, 32, "float16", 1.0), (3, 64, "bfloat16", 1.01), (4, -1, "float32", 1.0), (8, 32, "float16", 1.0)]


def triton_interpreter_case(bits, group, sdt, kappa):
    """Run in the child process below: the Triton solver vs the spec."""
    sdt = getattr(torch, sdt)
    w = mixed_weight(n=16, k=100, seed=4)
    fmt = Int(bits, group, scale_dtype=sdt)
    ref = reference(w, bits, fmt.group_size_for(100), sdt, kappa=kappa)
    got = hqq_solve(w, fmt, kappa=kappa, kernel="triton")
    assert_close_solutions(ref, got, f"triton {fmt.spec()}")
    assert (got.iters - ref.iters).abs().max() <= 2


def test_triton_interpreter_matches_reference():
    """triton picks "interpret or compile" when triton.language is first
    imported, so the interpreter runs in a fresh process (in this one triton
    may already be loaded for real, e.g. by torch.compile tests)."""
    require("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(pyquant.__file__)))
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("test_hqq_child", {os.path.abspath(__file__)!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for case in {TRITON_CASES!r}:
            mod.triton_interpreter_case(*case)
            print("ok", case, flush=True)
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert r.stdout.count("ok") == len(TRITON_CASES), r.stdout


# ------------------------------------------------------------ quality ---
def _weights():
    g = torch.Generator().manual_seed(5)
    return {
        "unit_normal": torch.randn(64, 256, generator=g),
        "llm_normal": torch.randn(64, 256, generator=g) * 0.02,
        "student_t3": torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02,
        "outliers": torch.randn(64, 256, generator=g) * 0.02 * (1 + 30 * (torch.rand(64, 256, generator=g) > 0.995)),
    }


def hqq_package_dequant(w, bits, group, axis, scale_dtype):
    """The peer on the same weight: hqq's Quantizer with its default optimizer,
    scale/zero rounded to the dtype we store them in (as HQQLinear does)."""
    from hqq.core.quantize import Quantizer

    with one_thread():
        wq, meta = Quantizer.quantize(w, nbits=bits, group_size=group, axis=axis, optimize=True, bitpack=False,
                                      device="cpu")
    meta["compute_dtype"] = torch.float32
    meta["scale"] = meta["scale"].to(scale_dtype).float()
    meta["zero"] = meta["zero"].to(scale_dtype).float()
    return Quantizer.dequantize(wq, meta)


@pytest.mark.parametrize("sdt", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_not_worse_than_hqq_package_axis1(bits, sdt):
    require("hqq")
    for name, w in _weights().items():
        fmt = Int(bits, 64, scale_dtype=sdt)
        theirs = hqq_package_dequant(w, bits, 64, 1, sdt)
        e_h = group_sq_err(w, theirs, 64)
        # the defaults (kappa=1.01), and kappa=1, the iteration hqq's default optimizer actually runs
        for kappa in (1.01, 1.0):
            e_o = group_sq_err(w, hqq_quantize(w, fmt, kappa=kappa).dequantize(), 64)
            assert e_o.sum() <= e_h.sum(), f"{name}, kappa={kappa}: {float(e_o.sum()):.6g} > hqq {float(e_h.sum()):.6g}"
        # With the same iteration, per group too, almost always: last-bit
        # differences (hqq divides by 1/s, sums in another order) can send a
        # group to a different fixed point, now and then a worse one.
        ratio = e_o / e_h.clamp_min(1e-30)
        assert (ratio <= 1 + 1e-5).double().mean() >= 0.99, f"{name}: worst group ratio {ratio.max():.5f}"


@pytest.mark.parametrize("bits", [2, 4])
def test_not_worse_than_hqq_package_axis0(bits):
    """hqq's axis=0 groups strided rows (``W.reshape(g, -1)``): permuting the
    rows of W makes our contiguous axis-0 groups the very same sets."""
    require("hqq")
    g = 32
    for name, w in _weights().items():
        n = w.shape[0]
        perm = torch.arange(n).view(g, n // g).T.flatten()
        qw = hqq_quantize(w[perm], Int(bits, g), axis=0)
        assert qw.shape == (w.shape[1], n)
        ours = torch.empty_like(w)
        ours[perm] = qw.dequantize().T
        theirs = hqq_package_dequant(w, bits, g, 0, torch.float16)
        e_o, e_h = ((w - ours) ** 2).sum(), ((w - theirs) ** 2).sum()
        assert e_o <= e_h, f"{name}: ours {float(e_o):.6g} > hqq {float(e_h):.6g}"


@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("bits", BITS)
def test_never_worse_than_rtn_per_group(bits, group):
    for name, w in list(_weights().items()) + [("mixed", mixed_weight())]:
        fmt = Int(bits, group)
        ours = hqq_quantize(w, fmt).dequantize()
        rtn = pyquant.quantize_weight(w, fmt).dequantize()
        e_o, e_r = group_sq_err(w, ours, group), group_sq_err(w, rtn, group)
        assert bool((e_o <= e_r * (1 + 1e-5) + 1e-12).all()), f"{name}: worst ratio {float((e_o / e_r).max()):.6f}"
        assert e_o.sum() <= e_r.sum()


# ---------------------------------------------------------------- axis ---
def test_axis0_is_the_transpose():
    w = mixed_weight(n=40, k=70)
    fmt = Int(3, 32)
    a = hqq_quantize(w, fmt, axis=0)
    b = hqq_quantize(w.t().contiguous(), fmt, axis=1)
    assert a.shape == (70, 40)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    rtn = pyquant.quantize_weight(w.t().contiguous(), fmt).dequantize()
    assert (w.t() - a.dequantize()).norm() <= (w.t() - rtn).norm()


def test_half_precision_input_and_packing():
    w = mixed_weight(seed=6)
    for dt in (torch.float16, torch.bfloat16):
        qw = hqq_quantize(w.to(dt), Int(4, 64))
        ref = hqq_quantize(w.to(dt).float(), Int(4, 64))
        assert all(torch.equal(qw.tensors[k], ref.tensors[k]) for k in qw.tensors)
    # the packed weight round-trips through the format and the ops
    qw = hqq_quantize(w, Int(4, 64))
    sol = hqq_solve(w, Int(4, 64))
    codes, scales, zeros = qw.format.unpack(qw)
    assert torch.equal(codes, sol.codes)
    assert torch.equal(scales.float(), sol.scales) and torch.equal(zeros.float(), sol.zeros)
    x = torch.randn(3, w.shape[1])
    torch.testing.assert_close(pyquant.qmatmul(x, qw), x @ qw.dequantize().T, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ bad input ---
def test_bad_input():
    w = torch.randn(8, 64)
    fmt = Int(4, 32)
    for bad in (float("nan"), float("inf")):
        wb = w.clone()
        wb[3, 7] = bad
        with pytest.raises(ValueRangeError, match="NaN or Inf"):
            hqq_quantize(wb, fmt)
    with pytest.raises(FormatError):
        Int(5, 32)
    with pytest.raises(FormatError):
        hqq_quantize(w, Int(4, 32, symmetric=True))
    with pytest.raises(FormatError):
        hqq_quantize(w, Int(4, 32, act_order=True))
    with pytest.raises(FormatError):
        hqq_quantize(w, NF4())
    with pytest.raises(ShapeError):
        hqq_quantize(torch.randn(64), fmt)
    with pytest.raises(ShapeError):
        hqq_quantize(torch.randn(0, 64), fmt)
    with pytest.raises(DtypeError):
        hqq_quantize(torch.randint(0, 5, (8, 64)), fmt)
    for kw in ({"axis": 2}, {"iters": -1}, {"iters": 2.5}, {"lp_norm": 0.0}, {"lp_norm": 1.5}, {"beta": 0.0},
               {"kappa": 0.9}, {"beta": 1e300, "kappa": 1e10}):
        with pytest.raises(ValueRangeError):
            hqq_quantize(w, fmt, **kw)
    with pytest.raises(KernelUnavailableError):
        hqq_quantize(w, fmt, kernel="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(KernelUnavailableError):
            hqq_quantize(w, fmt, kernel="cuda")
    # a range per code beyond fp16 (RTN's candidate overflows): ask for fp32 scales
    with pytest.raises(ValueRangeError, match="scale_dtype"):
        hqq_quantize(torch.tensor([[-1e6, 1e6] * 16]), fmt)
    hqq_quantize(torch.tensor([[-1e6, 1e6] * 16]), Int(4, 32, scale_dtype=torch.float32))


# ------------------------------------------------------------------ GPU ---
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("sdt", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("bits", BITS)
def test_gpu_solvers_match_reference(kernel, bits, group, sdt):
    if kernel == "triton":
        require("triton")
    w = mixed_weight(n=64, k=1000, seed=7)
    fmt = Int(bits, group, scale_dtype=sdt)
    ref = reference(w, bits, fmt.group_size_for(1000), sdt)
    got = hqq_solve(w.cuda(), fmt, kernel=kernel)
    got = type(got)(*(t.cpu() for t in (got.codes, got.scales, got.zeros, got.err, got.iters)))
    assert_close_solutions(ref, got, f"{kernel} {fmt.spec()}")
    qw = hqq_quantize(w.cuda(), fmt, kernel=kernel)
    actual = group_sq_err(w, qw.dequantize(kernel="reference").cpu(), group)
    torch.testing.assert_close(got.err.double(), actual, rtol=1e-4, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cuda", "triton"])
def test_gpu_solvers_large_and_ragged(kernel):
    if kernel == "triton":
        require("triton")
    torch.manual_seed(8)
    w = torch.randn(512, 4100) * 0.02
    for fmt in (Int(4, 64), Int(2, 256), Int(8, -1)):
        ref = hqq_solve(w, fmt, kernel="cpu" if pyquant._ext.available() else "reference")
        got = hqq_solve(w.cuda(), fmt, kernel=kernel)
        assert (got.codes.cpu() == ref.codes).double().mean() >= 0.99
        e_got, e_ref = got.err.double().sum().item(), ref.err.double().sum().item()
        assert abs(e_got - e_ref) <= 1e-3 * e_ref
