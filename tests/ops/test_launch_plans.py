"""Launch plans (pyquant.ops.plans): built once per weight and M bucket, never served
stale, the same path for pyquant.qmatmul and QuantLinear, the CUDA backend's plan
launching what its kernel expects (recorded by a stand-in extension,
benchmarks/_host_stubs.py), Triton's direct launches passing what its JIT passes
(a stand-in driver, in a subprocess: the kernels must be compiled, not
interpreted), and verification tied to a kernel's source hash."""
import copy
import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pyquant
from pyquant.errors import KernelUnavailableError
from pyquant.formats import Int
from pyquant.ops import dispatch, plans
from pyquant.ops.dispatch import Kernel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _host_stubs  # noqa: E402


def _qw(n=24, k=80, fmt=None, seed=0):
    torch.manual_seed(seed)
    return pyquant.quantize_weight(torch.randn(n, k), fmt or Int(4, 32, False))


@pytest.fixture
def builds(monkeypatch):
    calls = []
    real = plans.build_plan

    def counting(*args):
        calls.append(args[5])  # M
        return real(*args)

    monkeypatch.setattr(plans, "build_plan", counting)
    return calls


def test_one_plan_per_m_bucket_and_dtype(builds):
    qw = _qw()
    with torch.no_grad():
        for m in (1, 1, 3, 4, 3, 5, 8, 6):
            y = pyquant.qmatmul(torch.randn(m, 80), qw)
            assert y.shape == (m, 24)
        assert builds == [1, 3, 5]  # buckets 1, 4, 8
        pyquant.qmatmul(torch.randn(2, 80, dtype=torch.bfloat16), qw)
        pyquant.qmatmul(torch.randn(1, 80), qw, kernel="reference")
    assert builds == [1, 3, 5, 2, 1]


def test_plan_results_match_the_op(builds):
    qw = _qw()
    x, bias = torch.randn(2, 3, 80), torch.randn(24)
    with torch.no_grad():
        xt = x.transpose(0, 1)  # not contiguous
        want = torch.ops.pyquant.qmatmul(x, qw.tensor_list(), qw.format.spec(), 24, 80, bias, "auto")
        want_t = torch.ops.pyquant.qmatmul(xt, qw.tensor_list(), qw.format.spec(), 24, 80, bias, "auto")
        for _ in range(2):
            torch.testing.assert_close(pyquant.qmatmul(x, qw, bias), want, rtol=0, atol=0)
            torch.testing.assert_close(pyquant.qmatmul(xt, qw, bias), want_t, rtol=0, atol=0)
    assert len(builds) == 2  # the op's plans (kept per qweight tensor) and the QuantizedWeight's


def test_no_stale_plan_after_the_weight_changes(builds):
    qw = _qw()
    x = torch.randn(2, 80)
    with torch.no_grad():
        y0 = pyquant.qmatmul(x, qw)
        # a replaced tensor
        other = _qw(seed=1)
        qw.tensors["scales"] = other.tensors["scales"]
        qw.tensors["zeros"] = other.tensors["zeros"]
        qw.tensors["qweight"] = other.tensors["qweight"]
        torch.testing.assert_close(pyquant.qmatmul(x, qw), pyquant.qmatmul(x, other), rtol=0, atol=0)
        assert len(builds) == 3
        # the same tensor object pointing at new memory (t.data = ...)
        q = qw.tensors["qweight"]
        q.data = _qw(seed=0).tensors["qweight"].clone()
        qw.tensors["scales"].data = _qw(seed=0).tensors["scales"].clone()
        qw.tensors["zeros"].data = _qw(seed=0).tensors["zeros"].clone()
        torch.testing.assert_close(pyquant.qmatmul(x, qw), y0, rtol=0, atol=0)
        assert len(builds) == 4


def test_plan_cache_checks_identity_and_pointer():
    qw = _qw()
    cache = plans.PlanCache()
    qdata = qw.tensor_list()
    cache.reset(qdata)
    assert cache.valid_for(qdata)
    assert not cache.valid_for([t.clone() for t in qdata])
    assert not cache.valid_for([t.to("meta") for t in qdata])  # moved to another device
    assert not cache.valid_for(qdata[:-1])


def _cpu_format(family):
    from pyquant.formats import GGUF, NF4
    return {"int": Int(4, 32, False), "nf4": NF4(block_size=64), "gguf": GGUF("Q4_0")}[family]


@pytest.mark.skipif(pyquant._ext.load() is None, reason="the C++ extension is not built")
@pytest.mark.parametrize("family", ["int", "nf4", "gguf"])
def test_cpu_plans_are_built_and_keep_their_copies_alive(family, builds):
    """Each CPU family registers a plan, and a plan built from a packed tensor that is
    not contiguous keeps the contiguous copy its pointers point into: the copy freed
    and its memory reused gave garbage (an Int4 weight: errors of 23 and 95 where the
    contiguous weight's were 1e-5)."""
    torch.manual_seed(0)
    qw = pyquant.quantize_weight(torch.randn(48, 128), _cpu_format(family))
    assert dispatch.select_kernel("qmatmul", qw.format, torch.device("cpu"), 1).plan is not None
    name = next(iter(qw.tensors))
    q = qw.tensors[name]
    strided = torch.empty(tuple(q.shape) + (2,), dtype=q.dtype)[..., 0]
    strided.copy_(q)
    assert not strided.is_contiguous()
    x = torch.randn(2, 128)
    want = torch.ops.pyquant.qmatmul(x, qw.tensor_list(), qw.format.spec(), 48, 128, None, "auto")
    qw.tensors[name] = strided
    with torch.no_grad():
        for _ in range(3):
            y = pyquant.qmatmul(x, qw)
            gc.collect()
            churn = [torch.full((q.numel() + 64,), 255, dtype=q.dtype) for _ in range(8)]  # reuse freed memory
            torch.testing.assert_close(y, want, rtol=0, atol=0)
            del churn
    assert len(builds) == 2  # the op's plan (contiguous tensors) and the strided weight's


@pytest.mark.skipif(pyquant._ext.load() is None, reason="the C++ extension is not built")
def test_cpu_plan_follows_the_activation_mode_set_after_it(monkeypatch, builds):
    """PYQUANT_CPU_ACTIVATIONS is read at each call (cpu_activations.current), also
    by a plan already built: set, changed and unset between calls of one plan."""
    from pyquant.ops.backends import cpu_activations

    torch.manual_seed(0)
    qw = pyquant.quantize_weight(torch.randn(48, 128), _cpu_format("gguf"))
    x = torch.randn(1, 128)
    exact = x @ qw.dequantize().T
    monkeypatch.delenv(cpu_activations.ENV, raising=False)
    with torch.no_grad():
        int8 = pyquant.qmatmul(x, qw)  # "auto": GGUF takes int8 activations (ggml's arithmetic)
        assert not torch.equal(int8, exact)
        monkeypatch.setenv(cpu_activations.ENV, "fp32")
        torch.testing.assert_close(pyquant.qmatmul(x, qw), exact, rtol=1e-5, atol=1e-5)
        monkeypatch.setenv(cpu_activations.ENV, "int8")
        assert torch.equal(pyquant.qmatmul(x, qw), int8)
        monkeypatch.setenv(cpu_activations.ENV, "fp16")
        with pytest.raises(pyquant.ValueRangeError, match="'fp16'"):
            pyquant.qmatmul(x, qw)
        monkeypatch.delenv(cpu_activations.ENV)
        assert torch.equal(pyquant.qmatmul(x, qw), int8)
    assert builds == [1]


@pytest.mark.skipif(pyquant._ext.load() is None, reason="the C++ extension is not built")
@pytest.mark.parametrize("family", ["int", "int_act_order", "nf4", "gguf", "gguf_fp32"])
def test_cpu_plans_take_any_leading_dims(family):
    """The CPU plans take x of any leading dims (``takes_nd``: a transformer's 3-D x
    with no reshape of x and y around the call, ~1.5 us of a 576-wide product):
    every shape gives, bit for bit, the 2-D product of the same rows, in the same
    leading dims. Also no rows, a transposed (non-contiguous) x, bf16 x, a bias,
    an act_order weight (x gathered along its last dim) and GGUF in fp32 mode
    (the unplanned function, behind a reshape)."""
    from pyquant.ops.backends.cpu_activations import cpu_activations

    torch.manual_seed(0)
    k = 128
    if family == "int_act_order":
        fmt = Int(4, 32, False, torch.float16, True)
        qw = fmt.pack(torch.randint(0, 16, (48, k), dtype=torch.int32), torch.randn(48, 4) * 0.02,
                      torch.rand(48, 4) * 16, torch.randperm(k).to(torch.int32))
    else:
        qw = pyquant.quantize_weight(torch.randn(48, k), _cpu_format(family.split("_")[0]))
    plan = dispatch.select_kernel("qmatmul", qw.format, torch.device("cpu"), 1).plan(
        qw.tensor_list(), qw.format, (48, k), torch.device("cpu"), 1)
    assert getattr(plan, "takes_nd", False)
    bias = torch.randn(48)
    xs = [torch.randn(3, 5, k), torch.randn(2, 1, 3, k), torch.randn(k), torch.randn(0, 4, k),
          torch.randn(5, k, 3).transpose(1, 2), torch.randn(2, 3, k).to(torch.bfloat16)]
    with torch.no_grad(), cpu_activations("fp32" if family == "gguf_fp32" else "auto"):
        for x in xs:
            for b in (None, bias):
                y = pyquant.qmatmul(x, qw, b)
                flat = pyquant.qmatmul(x.reshape(-1, k), qw, b)
                assert y.shape == (*x.shape[:-1], 48) and y.dtype == x.dtype, (tuple(x.shape), y.shape, y.dtype)
                assert torch.equal(y.reshape(-1, 48), flat), (family, tuple(x.shape))


def test_quant_linear_takes_the_same_fast_path(builds):
    lin = pyquant.QuantLinear(_qw(), bias=torch.randn(24, requires_grad=True))
    x = torch.randn(4, 80)
    with torch.no_grad():
        want = torch.ops.pyquant.qmatmul(x, lin.quantized_weight.tensor_list(), lin.qformat.spec(), 24, 80, lin.bias,
                                         "auto")
        for _ in range(3):
            torch.testing.assert_close(lin(x), want, rtol=0, atol=0)
    assert builds == [4, 4]  # the op's plans and the module's
    y = lin(x)  # gradients (the bias is a parameter): the op, an autograd node, as before
    assert y.grad_fn is not None and len(builds) == 2


def test_quant_linear_rebuilds_after_to_load_and_copy(builds):
    lin = pyquant.QuantLinear(_qw(), bias=torch.randn(24))
    x = torch.randn(1, 80)
    with torch.no_grad():
        lin(x)
        twin = copy.deepcopy(lin)  # starts without plans, holds its own tensors
        torch.testing.assert_close(twin(x), lin(x), rtol=0, atol=0)
        assert len(builds) == 2
        other = pyquant.QuantLinear(_qw(seed=3), bias=torch.zeros(24))
        lin.load_state_dict(other.state_dict())
        torch.testing.assert_close(lin(x), other(x), rtol=0, atol=0)
        lin.to(torch.bfloat16)  # the bias is converted; packed buffers stay
        assert lin(x.bfloat16()).dtype == torch.bfloat16


def test_bucket_with_a_kernel_boundary_plans_per_m(monkeypatch):
    # two reference kernels: M <= 5 and M > 5, a boundary inside the bucket 5..8
    calls = []

    def make(tag):
        def fn(x, qdata, fmt, shape, bias):
            calls.append((tag, x.shape[0]))
            return torch.zeros(x.shape[0], shape[0])

        return fn

    small = Kernel("qmatmul", "reference", "any", "reference_any_qmatmul_small", lambda f, d, m: m <= 5,
                   make("small"))
    large = Kernel("qmatmul", "reference", "any", "reference_any_qmatmul_large", lambda f, d, m: m > 5,
                   make("large"))
    monkeypatch.setitem(dispatch._REGISTRY, ("qmatmul", "reference"), [small, large])
    qw = _qw()
    with torch.no_grad():
        for m in (5, 6, 8, 5):
            pyquant.qmatmul(torch.randn(m, 80), qw, kernel="reference")
    assert calls == [("small", 5), ("large", 6), ("large", 8), ("small", 5)]


def test_forced_kernel_that_cannot_take_the_weight_names_the_shape():
    qw = _qw(fmt=Int(8, 32, True))
    with pytest.raises(KernelUnavailableError, match=r"weight 24x80"):
        pyquant.qmatmul(torch.randn(2, 80), qw, kernel="cuda")
    with torch.no_grad(), _host_stubs.stub_extension(), _host_stubs.cuda_backend_on_cpu():
        with pytest.raises(KernelUnavailableError, match=r"int8_g32_sym.* weight 24x80 on device cpu \(M=9\)"):
            pyquant.qmatmul(torch.randn(9, 80), _qw(fmt=Int(8, 32, True)), kernel="cuda")
        with pytest.raises(KernelUnavailableError, match=r"weight 24x80 on device cpu \(M=9\)"):
            pyquant.qmatmul(torch.randn(9, 80), _qw(), kernel="cuda")  # the GEMV stops at M = 8


def test_cuda_plan_launches_what_the_kernel_expects():
    qw = _qw(n=48, k=300, fmt=Int(4, 32, False, torch.bfloat16))
    x = torch.randn(3, 300, dtype=torch.float16)
    bias = torch.randn(48, dtype=torch.float32)
    with torch.no_grad(), _host_stubs.stub_extension() as ext, _host_stubs.cuda_backend_on_cpu():
        ext.record = True
        for _ in range(2):
            y = pyquant.qmatmul(x, qw, bias, kernel="cuda")
        lin = pyquant.QuantLinear(qw, bias=bias, kernel="cuda")
        lin(x)
    assert y.shape == (3, 48) and y.dtype == torch.float16
    (name, args), again, via_module = ext.calls
    assert name == "int4_gemv_cuda" and again[0] == name and via_module[0] == name
    t = qw.tensors
    want = (x.data_ptr(), t["qweight"].data_ptr(), t["scales"].data_ptr(), t["zeros"].data_ptr(), bias.data_ptr())
    assert args[:5] == want
    assert args[6:] == (3, 48, 300, 32, 2, 0, 1, 0)  # M N K group, bf16 scales, fp32 bias, fp16 x, stream 0
    assert again[1][:5] == want and again[1][6:] == args[6:]
    assert via_module[1][1:4] == want[1:4] and via_module[1][4] == lin.bias.data_ptr()  # the module's own bias
    assert via_module[1][6:] == args[6:]


def test_verified_means_the_recorded_source(monkeypatch, tmp_path):
    src = tmp_path / "kernel.cu"
    src.write_text("// v1\n")
    fake = Kernel("qmatmul", "cuda", "int4", "cuda_int4_qmatmul_fake", lambda f, d, m: False, None,
                  sources=lambda: (tmp_path, [src]))
    monkeypatch.setitem(dispatch._REGISTRY, ("qmatmul", "cuda"), [*dispatch._REGISTRY[("qmatmul", "cuda")], fake])
    good = dispatch.source_hash("cuda_int4_qmatmul_fake")
    assert good and len(good) == 64
    vfile = tmp_path / "verified_kernels.json"
    vfile.write_text(json.dumps({"kernels": {
        "cuda_int4_qmatmul_fake": {"device": "d", "date": "t", "source_sha256": good},
        "cuda_int4_qmatmul_gemv": {"device": "d", "date": "t", "source_sha256": "0" * 64},  # another source
        "cuda_int_dequantize": {"device": "d", "date": "t", "source_sha256": None},  # none recorded
    }}))
    monkeypatch.setattr(dispatch, "VERIFIED_FILE", vfile)
    dispatch.verified_kernels.cache_clear()
    try:
        assert dispatch.verified_kernels() == {"cuda_int4_qmatmul_fake"}
        src.write_text("// v2: edited after its GPU run\n")
        assert dispatch.verified_kernels() == {"cuda_int4_qmatmul_fake"}  # computed once per process
        dispatch.verified_kernels.cache_clear()
        assert dispatch.verified_kernels() == frozenset()
        src.unlink()  # a source that is not on disk cannot be named
        assert dispatch.source_hash("cuda_int4_qmatmul_fake") is None
    finally:
        dispatch.verified_kernels.cache_clear()


def test_cuda_kernel_sources_follow_includes():
    from pyquant.ops import kernel_sources

    names = {p.name for p in kernel_sources.cuda_sources("int4_gemv.cu")}
    assert {"int4_gemv.cu", "cuda_common.cuh", "launchers.h", "common.h", "static_switch.h"} <= names
    assert "w8a8.cu" not in names
    assert dispatch.source_hash("cuda_int4_qmatmul_gemv") != dispatch.source_hash("cuda_int8_w8a8_matmul")



def test_every_cuda_kernel_names_its_own_sources():
    from pyquant.ops import kernel_sources

    cuda = [k for k in dispatch.kernels() if k.backend == "cuda"]
    assert cuda
    hashes = {k.name: dispatch.source_hash(k.name) for k in cuda}
    assert all(hashes.values()), hashes
    # no .cu file counts for two kernels: editing one kernel leaves the others verified
    seen = {}
    for k in cuda:
        for f in (p.name for p in k.sources()[1] if p.suffix == ".cu"):
            assert f not in seen, (f, seen.get(f), k.name)
            seen[f] = k.name
    with pytest.raises(ValueError, match="must name its sources"):
        dispatch.register_kernel("qmatmul", "cuda", "int4", lambda f, d, m: False, tag="nosrc")(lambda *a: None)
    assert kernel_sources.cuda_sources("gptq_block.cu") != kernel_sources.cuda_sources("hqq_solver.cu")


def test_an_unverified_kernel_does_not_hide_a_verified_one_of_its_backend(monkeypatch):
    dev = torch.device("cuda")
    takes_all = lambda f, d, m: True  # noqa: E731
    new = Kernel("qmatmul", "cuda", "int4", "cuda_int4_qmatmul_new", takes_all, None, sources=lambda: None)
    old = Kernel("qmatmul", "cuda", "int4", "cuda_int4_qmatmul_old", takes_all, None, sources=lambda: None)
    monkeypatch.setitem(dispatch._REGISTRY, ("qmatmul", "cuda"), [new, old])
    monkeypatch.setattr(dispatch, "verified_kernels", lambda: frozenset({"cuda_int4_qmatmul_old"}))
    fmt = Int(4, 128)
    assert dispatch.select_kernel("qmatmul", fmt, dev, 16) is old
    assert dispatch.select_kernel("qmatmul", fmt, dev, 16, kernel="cuda") is new  # by name: the first that takes it
    both = frozenset({"cuda_int4_qmatmul_new", "cuda_int4_qmatmul_old"})
    monkeypatch.setattr(dispatch, "verified_kernels", lambda: both)
    assert dispatch.select_kernel("qmatmul", fmt, dev, 16) is new


def test_kernel_by_full_name(monkeypatch):
    dev = torch.device("cuda")
    small = Kernel("qmatmul", "cuda", "int4", "cuda_int4_qmatmul_small", lambda f, d, m: m <= 8, None,
                   sources=lambda: None)
    other = Kernel("qmatmul", "cuda", "int4", "cuda_int4_qmatmul_other", lambda f, d, m: True, None,
                   sources=lambda: None)
    monkeypatch.setitem(dispatch._REGISTRY, ("qmatmul", "cuda"), [small, other])
    fmt = Int(4, 128)
    assert dispatch.select_kernel("qmatmul", fmt, dev, 4, kernel="cuda") is small
    assert dispatch.select_kernel("qmatmul", fmt, dev, 4, kernel="cuda_int4_qmatmul_other") is other
    with pytest.raises(KernelUnavailableError, match=r"'cuda_int4_qmatmul_small' does not take .* 64x256 .*M=16"):
        dispatch.select_kernel("qmatmul", fmt, dev, 16, kernel="cuda_int4_qmatmul_small", shape=(64, 256))
    with pytest.raises(KernelUnavailableError, match="name of a qmatmul kernel"):
        dispatch.select_kernel("qmatmul", fmt, dev, 4, kernel="cuda_int4_qmatmul_typo")
    with pytest.raises(KernelUnavailableError, match="name of a dequantize kernel"):  # a kernel of another op
        dispatch.select_kernel("dequantize", fmt, dev, 4, kernel="cuda_int4_qmatmul_other")

TRITON_SCRIPT = textwrap.dedent(
    r"""
    import sys, torch
    sys.path.insert(0, "benchmarks")
    import _host_stubs as H
    import pyquant
    from pyquant.formats import Int

    torch.manual_seed(0)
    qw = pyquant.quantize_weight(torch.randn(64, 1024), Int(4, 128, False, torch.float16))
    bias = torch.randn(64, dtype=torch.float16)
    with torch.no_grad(), H.triton_on_cpu() as drv:
        drv.record = True
        for m in (1, 16):
            x = torch.randn(m, 1024, dtype=torch.float16)
            for _ in range(2):  # through the JIT, then straight to the compiled kernel
                pyquant.qmatmul(x, qw, bias, kernel="triton")
        assert len(drv.launches) >= 4, drv.launches
        by_name = {}
        for name, args in drv.launches:
            by_name.setdefault(name, []).append(args)
        for name, calls in by_name.items():
            first, second = calls[0], calls[1]
            assert len(first) == len(second), name
            def norm(a):
                return [("T", v.dtype, tuple(v.shape)) if isinstance(v, torch.Tensor) else v for v in a]
            f, s = norm(first), norm(second)
            # grid, stream, metadata and every argument equal; tensors by dtype and shape
            assert f[:4] == s[:4] and f[9:] == s[9:], (name, f, s)
            weights = [v for v in first[9:] if isinstance(v, torch.Tensor) and v.dtype == torch.uint8]
            assert all(any(w is t for t in qw.tensors.values()) for w in weights), name
    print("launches", len(drv.launches))
    """
)


@pytest.mark.slow
def test_triton_direct_launch_passes_what_the_jit_passes():
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:
        pytest.skip(f"triton has no NVIDIA backend here: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # kernels compiled for sm_90
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], capture_output=True, text=True, timeout=1200,
                       env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.startswith("launches")


def test_steady_state_does_no_host_work_but_the_launch(monkeypatch):
    # after the first call: no kernel selection, no packed-tensor checks, no format parsing
    from pyquant.ops.backends import cuda

    counts = {"select": 0, "named_packed": 0}

    def counting(name, real):
        def f(*a, **kw):
            counts[name] += 1
            return real(*a, **kw)

        return f

    monkeypatch.setattr(plans, "select_kernel", counting("select", plans.select_kernel))
    monkeypatch.setattr(cuda, "named_packed", counting("named_packed", cuda.named_packed))
    qw = _qw(n=48, k=256, fmt=Int(4, 128, False, torch.float16))
    lin = pyquant.QuantLinear(qw, kernel="cuda")
    x = torch.randn(2, 256, dtype=torch.float16)
    with torch.no_grad(), _host_stubs.stub_extension() as ext, _host_stubs.cuda_backend_on_cpu():
        pyquant.qmatmul(x, qw, kernel="cuda")
        lin(x)
        first = dict(counts)
        ext.record = True
        for _ in range(5):
            pyquant.qmatmul(x, qw, kernel="cuda")
            lin(x)
    assert counts == first and first["named_packed"] == 2
    assert len(ext.calls) == 10
