"""The op layer: torch.library registration, dispatch, validation at the boundary."""
import pytest
import torch

import pyquant
from pyquant.formats import GGUF, NF4, Int
from pyquant.ops import reference
from pyquant.ops.dispatch import select_kernel
from tests.isolated_python import run_python

FORMATS = [Int(4, 32, False), Int(3, 64, True, torch.bfloat16), Int(8, -1, True, torch.float32), Int(2, 128, False)]


def _qw(fmt=Int(4, 32, False), n=24, k=80, seed=0):
    torch.manual_seed(seed)
    return pyquant.quantize_weight(torch.randn(n, k), fmt)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.spec())
def test_opcheck_every_op(fmt):
    qw = _qw(fmt)
    n, k = qw.shape
    spec = fmt.spec()
    x = torch.randn(3, k, requires_grad=True)
    bias = torch.randn(n, requires_grad=True)
    torch.library.opcheck(torch.ops.pyquant.qmatmul.default, (x, qw.tensor_list(), spec, n, k, bias, "auto"))
    torch.library.opcheck(torch.ops.pyquant.qmatmul.default, (x.detach(), qw.tensor_list(), spec, n, k, None, "reference"))
    torch.library.opcheck(torch.ops.pyquant.dequantize.default, (qw.tensor_list(), spec, n, k, torch.float16, "auto"))
    codes = pyquant.unpack(qw)
    torch.library.opcheck(torch.ops.pyquant.pack.default, (codes, spec, "auto"))
    torch.library.opcheck(torch.ops.pyquant.unpack.default, (qw.tensors["qweight"], spec, n, k, "auto"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_qmatmul_matches_reference_with_batch_dims_and_bias(dtype):
    qw = _qw()
    x = torch.randn(2, 3, 80).to(dtype)
    bias = torch.randn(24)
    y = pyquant.qmatmul(x, qw, bias)
    assert y.dtype == dtype and y.shape == (2, 3, 24)
    ref = (x.double() @ qw.dequantize().double().T + bias.double()).to(dtype)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert torch.allclose(y.float(), ref.float(), atol=tol, rtol=tol), float((y.float() - ref.float()).abs().max())


def test_qmatmul_empty_batch_and_m1():
    qw = _qw()
    assert pyquant.qmatmul(torch.randn(0, 80), qw).shape == (0, 24)
    assert pyquant.qmatmul(torch.randn(80), qw).shape == (24,)


def test_qmatmul_gradient_wrt_input_and_bias():
    qw = _qw()
    x = torch.randn(4, 80, dtype=torch.float64).float().requires_grad_()
    bias = torch.randn(24, requires_grad=True)
    y = pyquant.qmatmul(x, qw, bias)
    g = torch.randn_like(y)
    y.backward(g)
    w = qw.dequantize()
    assert torch.allclose(x.grad, g @ w, atol=1e-5)
    assert torch.allclose(bias.grad, g.sum(0), atol=1e-5)


def test_compile_fullgraph_qmatmul():
    qw = _qw()

    def f(x):
        return torch.relu(pyquant.qmatmul(x, qw)) * 2

    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(5, 80)
    assert torch.allclose(compiled(x), f(x), atol=1e-5)


def test_dequantize_dtypes_are_casts_of_fp32():
    qw = _qw(Int(4, 32, False, torch.float32))
    w32 = pyquant.dequantize(qw, torch.float32)
    for dt in (torch.float16, torch.bfloat16):
        assert torch.equal(pyquant.dequantize(qw, dt), w32.to(dt))


def test_reference_is_registered_for_every_family():
    for fmt in (Int(4), NF4(), GGUF("Q4_K")):
        k = select_kernel("qmatmul", fmt, torch.device("cpu"), 1, "reference")
        assert k.backend == "reference"


def test_forced_unknown_or_unavailable_kernel():
    qw = _qw()
    x = torch.randn(2, 80)
    with pytest.raises(pyquant.KernelUnavailableError, match="'bogus'"):
        pyquant.qmatmul(x, qw, kernel="bogus")
    with pytest.raises(pyquant.KernelUnavailableError, match="cuda"):
        pyquant.qmatmul(x, qw, kernel="cuda")


@pytest.mark.parametrize("planned", [False, True], ids=["first_call", "after_a_plan"])
def test_qmatmul_bad_input(planned):
    qw = _qw()
    if planned:  # a launch plan for (2, 80) float32 x exists: the steady-state path must still check
        pyquant.qmatmul(torch.randn(2, 80), qw, torch.randn(24))
    with pytest.raises(pyquant.ShapeError, match=r"\(2, 81\)"):
        pyquant.qmatmul(torch.randn(2, 81), qw)
    with pytest.raises(pyquant.DtypeError, match="int32"):
        pyquant.qmatmul(torch.ones(2, 80, dtype=torch.int32), qw)
    with pytest.raises(pyquant.DtypeError, match="float64"):
        pyquant.qmatmul(torch.ones(2, 80, dtype=torch.float64), qw)
    with pytest.raises(pyquant.ShapeError, match=r"bias must have shape \(24,\)"):
        pyquant.qmatmul(torch.randn(2, 80), qw, torch.randn(23))
    with pytest.raises(pyquant.FormatError, match="QuantizedWeight"):
        pyquant.qmatmul(torch.randn(2, 80), torch.randn(24, 80))
    with pytest.raises(pyquant.DtypeError, match="Tensor"):
        pyquant.qmatmul([1.0] * 80, qw)
    meta_x = torch.randn(2, 80, device="meta")
    with pytest.raises(pyquant.DeviceError, match="meta"):
        pyquant.qmatmul(meta_x, qw)
    with pytest.raises(pyquant.DtypeError, match="int32"):
        pyquant.qmatmul(torch.randn(2, 80), qw, torch.ones(24, dtype=torch.int32))
    with pytest.raises(pyquant.DeviceError, match="meta"):
        pyquant.qmatmul(torch.randn(2, 80), qw, torch.randn(24, device="meta"))
    with pytest.raises(pyquant.ShapeError, match=r"bias must have shape \(24,\)"):
        pyquant.qmatmul(torch.randn(2, 80), qw, torch.randn(1, 24))


def test_dequantize_bad_input():
    qw = _qw()
    with pytest.raises(pyquant.DtypeError, match="int8"):
        pyquant.dequantize(qw, torch.int8)
    with pytest.raises(pyquant.FormatError):
        pyquant.dequantize("not a weight")


def test_pack_bad_input():
    with pytest.raises(pyquant.ShapeError, match="non-empty"):
        pyquant.pack(torch.zeros(0, 4, dtype=torch.uint8), Int(4))
    with pytest.raises(pyquant.DtypeError, match="float32"):
        pyquant.pack(torch.zeros(2, 4), Int(4))
    with pytest.raises(pyquant.FormatError, match="code formats"):
        pyquant.pack(torch.zeros(2, 256, dtype=torch.uint8), GGUF("Q4_K"), kernel="reference")


def test_auto_kernel_matches_the_reference_spec():
    # Whatever auto picks here (the C++ CPU kernel when built) gives the spec's values.
    qw = _qw(Int(4, 128, False))
    x = torch.randn(3, 80)
    auto = pyquant.qmatmul(x, qw)
    ref = reference.qmatmul(x, qw.tensor_list(), qw.format, qw.shape, None)
    assert torch.allclose(auto, ref, atol=1e-4)


def test_reference_spec_is_what_dispatch_runs_by_default_without_extension():
    # A fresh interpreter in which `import pyquant._C` fails: auto dispatch must
    # choose the reference kernels, run exactly them (bit-equal to the spec, and
    # their code is what executes), refuse kernel="cpu", and say so once.
    r = run_python(
        """
        import sys, warnings
        import torch, pyquant
        from pyquant.formats import GGUF, NF4, Int
        from pyquant.ops import reference
        from pyquant.ops.dispatch import select_kernel

        cpu = torch.device("cpu")
        ran = set()

        def record(frame, event, arg):
            if event == "call":
                ran.add(frame.f_code)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for fmt in (Int(4, 128, False), NF4(64, True), GGUF("Q4_K")):
                torch.manual_seed(0)
                qw = pyquant.quantize_weight(torch.randn(24, 256), fmt)
                x, n, k = torch.randn(3, 256), *qw.shape
                chosen = {op: select_kernel(op, fmt, cpu, 3) for op in ("qmatmul", "dequantize")}
                assert all(kern.backend == "reference" for kern in chosen.values()), (fmt, chosen)
                ran.clear()
                sys.setprofile(record)
                try:
                    y, w = pyquant.qmatmul(x, qw), pyquant.dequantize(qw)
                finally:
                    sys.setprofile(None)
                assert all(kern.fn.__code__ in ran for kern in chosen.values()), (fmt, "the reference did not run")
                assert torch.equal(y, reference.qmatmul(x, qw.tensor_list(), fmt, (n, k), None)), fmt
                assert torch.equal(w, reference.dequantize(qw.tensor_list(), fmt, (n, k), torch.float32)), fmt
                try:
                    pyquant.qmatmul(x, qw, kernel="cpu")
                except pyquant.KernelUnavailableError:
                    pass
                else:
                    raise AssertionError(f"kernel='cpu' ran for {fmt} without the extension")
        said = [str(m.message) for m in caught if "extension unavailable" in str(m.message)]
        assert len(said) == 1 and "reference" in said[0], said
        assert "pyquant._C" not in sys.modules and pyquant.env()["cpu_cxx"] is False
        print("reference ran")
        """,
        without_extension=True,
    )
    assert r.returncode == 0 and r.stdout.strip() == "reference ran", r.stdout + r.stderr


@pytest.mark.parametrize("fmt", [Int(4, 32, False), NF4(64, True), GGUF("Q4_K")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_into_out(fmt, dtype):
    torch.manual_seed(0)
    qw = pyquant.quantize_weight(torch.randn(6, 256), fmt)
    out = torch.full((6, 256), float("nan"), dtype=dtype)
    res = pyquant.dequantize(qw, dtype, out=out)
    assert res is out
    assert torch.equal(out, pyquant.dequantize(qw, dtype))
    torch.library.opcheck(torch.ops.pyquant.dequantize_out.default, (qw.tensor_list(), fmt.spec(), 6, 256, "auto", out))


def test_dequantize_out_bad_input():
    qw = _qw()
    with pytest.raises(pyquant.ShapeError, match=r"\(24, 80\)"):
        pyquant.dequantize(qw, torch.float32, out=torch.empty(24, 81))
    with pytest.raises(pyquant.ShapeError, match="float16"):
        pyquant.dequantize(qw, torch.float16, out=torch.empty(24, 80))
    with pytest.raises(pyquant.ShapeError, match="not contiguous"):
        pyquant.dequantize(qw, torch.float32, out=torch.empty(80, 24).T)


def _count_eager_calls(monkeypatch):
    """Counts calls that bypass torch.ops.pyquant.qmatmul: the eager path runs the
    weight's launch plan (pyquant.ops.plans) instead of the op."""
    from pyquant.ops import plans

    calls = []
    real_run, real_planned = plans.run_qmatmul, plans.PlanCache.planned

    def counting(*args):
        calls.append(1)
        return real_run(*args)

    def counting_hits(*args):  # a later call: a plan found
        plan = real_planned(*args)
        if plan is not None:
            calls.append(1)
        return plan

    monkeypatch.setattr(plans, "run_qmatmul", counting)
    monkeypatch.setattr(plans.PlanCache, "planned", counting_hits)
    return calls


def test_eager_inference_skips_the_op_layer_with_the_same_result(monkeypatch):
    qw = _qw()
    x, bias = torch.randn(3, 80), torch.randn(24)
    via_op = torch.ops.pyquant.qmatmul(x, qw.tensor_list(), qw.format.spec(), 24, 80, bias, "auto")
    calls = _count_eager_calls(monkeypatch)
    for i in range(2):  # the plan built, then found
        y = pyquant.qmatmul(x, qw, bias)
        assert len(calls) == i + 1
        assert torch.equal(y, via_op)


@pytest.mark.parametrize("planned", [False, True], ids=["first_call", "after_a_plan"])
@pytest.mark.parametrize("case", ["x_requires_grad", "bias_requires_grad", "fake_mode", "vmap"])
def test_op_layer_kept_when_something_must_see_the_op(monkeypatch, case, planned):
    qw = _qw()
    x, bias = torch.randn(3, 80), torch.randn(24)
    if planned:  # plans for x (3, 80) and for one row, with and without the bias
        pyquant.qmatmul(x, qw, bias), pyquant.qmatmul(x, qw), pyquant.qmatmul(x[0:1], qw)
    calls = _count_eager_calls(monkeypatch)
    if case == "x_requires_grad":
        y = pyquant.qmatmul(x.requires_grad_(), qw, bias)
        assert y.grad_fn is not None
    elif case == "bias_requires_grad":
        y = pyquant.qmatmul(x, qw, bias.requires_grad_())
        assert y.grad_fn is not None
    elif case == "fake_mode":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fx = mode.from_tensor(x)
            y = pyquant.qmatmul(fx, qw)
        assert y.shape == (3, 24)
    else:
        y = torch.vmap(lambda row: pyquant.qmatmul(row, qw))(x)
        assert torch.allclose(y, x @ qw.dequantize().T, atol=1e-4)
    assert calls == []


def test_requires_grad_under_no_grad_takes_the_eager_path(monkeypatch):
    qw = _qw()
    x = torch.randn(2, 80, requires_grad=True)
    calls = _count_eager_calls(monkeypatch)
    with torch.no_grad():
        y = pyquant.qmatmul(x, qw)
    assert len(calls) == 1 and y.grad_fn is None


def test_vmap_over_x_and_bias():
    qw = _qw()
    x, bias = torch.randn(5, 2, 80), torch.randn(5, 24)
    y = torch.vmap(lambda xi, bi: pyquant.qmatmul(xi, qw, bi))(x, bias)
    ref = x @ qw.dequantize().T + bias[:, None, :]
    assert y.shape == (5, 2, 24) and torch.allclose(y, ref, atol=1e-4)
    y2 = torch.vmap(lambda xi: pyquant.qmatmul(xi, qw, bias[0]), in_dims=1)(x)
    assert torch.allclose(y2, (x @ qw.dequantize().T + bias[0]).transpose(0, 1), atol=1e-4)
