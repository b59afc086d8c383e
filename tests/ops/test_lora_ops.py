"""QLoRA's ops: ``lora_qmatmul`` (forward, low-rank term in the epilogue) and
``qmatmul_transposed`` (``g @ W_hat``, the backward's grad_x).

* The autograd formulas: ``torch.autograd.gradcheck`` (fast mode: random
  Jacobian-vector products) in float64 on the spec (the reference kernels
  compute float64 inputs in float64), and every gradient of the CPU kernels
  element-wise against autograd through the dequantized float layer.
* Every kernel against the spec on the same inputs: the CPU C++ kernels on both
  SIMD paths and every CPU strategy (the transposed product's streaming kernel
  up to 8 rows of g and tiled GEMM above; decoded panels + torch.mm for bf16 g,
  GGUF and the scalar level, with panels small enough that there are several
  and the last is ragged; the forward's low-rank epilogue at every rank); their decode is
  bit-exact (a one-hot g selects weight rows exactly); the Triton kernels under
  the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on the GPU in
  gpu_check.sh (test names give the kernel names benchmarks/verified.py verifies).
* Memory: one layer's forward + backward never allocates an N x K float tensor
  (the CPU allocator's own accounting, through the profiler; a control shows
  the measurement sees a dequantized weight).
* ``opcheck`` of both ops; the qmatmul backward goes through the transposed op.
"""
from __future__ import annotations

import json

import pytest
import torch

import pyquant
from pyquant import _ext
from pyquant.errors import KernelUnavailableError, ShapeError
from pyquant.formats import GGUF, NF4, Int
from pyquant.ops import reference
from pyquant.ops.backends import cpu_lora
from pyquant.ops.dispatch import select_kernel
from pyquant.ops.reference import lora as lora_ref
from tests.deps import installed
from tests.kernels import simd_level, swap_kernel
from tests.ops.test_cpu_int import make_qw

C = _ext.load()
needs_ext = pytest.mark.skipif(C is None, reason="compiled extension pyquant._C not built")
needs_triton = pytest.mark.skipif(not installed("triton"), reason="triton is not installed")


simd = simd_level


def int_qw(bits=4, group=32, sym=False, sdtype=torch.float16, act_order=False, n=40, k=200):
    """Random codes over the full range, signed scales, non-integer zeros; K = 200 is ragged."""
    return make_qw(bits, group, sym, sdtype, n, k, act_order)


def rtn_qw(fmt, n, k, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return pyquant.quantize_weight(w, fmt)


# (id, QuantizedWeight factory): every bit width, group kinds, sym/asym, act_order,
# NF4 blocks spanning rows and odd K, a GGUF type
WEIGHTS = {
    "int4_g32": lambda: int_qw(4, 32),
    "int3_g64_sym_bf16": lambda: int_qw(3, 64, True, torch.bfloat16),
    "int2_g128": lambda: int_qw(2, 128, k=300),
    "int8_pc_fp32": lambda: int_qw(8, -1, sdtype=torch.float32),
    "int4_g64_actorder": lambda: int_qw(4, 64, act_order=True),
    "nf4_b64": lambda: rtn_qw(NF4(64, double_quant=False), 40, 256),
    "nf4_b32_dq_ragged": lambda: rtn_qw(NF4(32), 37, 129),
    "gguf_q4_0": lambda: rtn_qw(GGUF("Q4_0"), 24, 256),
}
CPU_WEIGHTS = [w for w in WEIGHTS]
SPEC_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def spec_weight(qw):
    return reference.dequantize_fp32(qw.format, qw.tensor_list(), qw.shape)


def close(out, ref, dtype, what):
    """Relative to the largest value of the exact result (fp32 sums reorder)."""
    scale = ref.double().abs().max().clamp_min(1e-6)
    err = float((out.double() - ref.double()).abs().max() / scale)
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    assert err <= SPEC_TOL[dtype], f"{what}: max error {err:.3g} of max |ref| (tol {SPEC_TOL[dtype]})"


def transposed(g, qw, kernel):
    n, k = qw.shape
    return torch.ops.pyquant.qmatmul_transposed(g, qw.tensor_list(), qw.format.spec(), n, k, kernel)


def lora(x, qw, A, B, scale, bias, kernel, x_lora=None):
    n, k = qw.shape
    return torch.ops.pyquant.lora_qmatmul(x, qw.tensor_list(), qw.format.spec(), n, k, bias, A, B, scale, x_lora,
                                          kernel)


# --- autograd: gradcheck in float64 on the spec -----------------------------------------
# small weights: gradcheck perturbs every input element (act_order; NF4 blocks spanning rows)
GRADCHECK_WEIGHTS = {
    "int4_g32_actorder": lambda: int_qw(4, 32, act_order=True, n=6, k=40),
    "nf4_b32_dq_ragged": lambda: rtn_qw(NF4(32), 5, 37),
}


@pytest.mark.parametrize("name", list(GRADCHECK_WEIGHTS))
def test_gradcheck_lora_qmatmul(name):
    qw = GRADCHECK_WEIGHTS[name]()
    n, k = qw.shape
    gen = torch.Generator().manual_seed(1)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, A, B, bias = leaf(3, k), leaf(2, k), leaf(n, 2), leaf(n)
    assert torch.autograd.gradcheck(lambda x, A, B, bias: lora(x, qw, A, B, 0.7, bias, "reference"), (x, A, B, bias),
                                    fast_mode=True)
    # a separate adapter input (x after dropout) and both outputs (y and the saved xa) differentiated
    xl, x3 = leaf(2, 2, k), leaf(2, 2, k)
    assert torch.autograd.gradcheck(lambda x, xl, A, B: lora(x, qw, A, B, 1.3, None, "reference", xl), (x3, xl, A, B),
                                    fast_mode=True)


def test_gradcheck_qmatmul_transposed_and_its_backward_is_qmatmul():
    qw = GRADCHECK_WEIGHTS["int4_g32_actorder"]()
    n, k = qw.shape
    g = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: transposed(g, qw, "reference"), (g,))
    # linear in g: its gradient is a qmatmul (which makes qmatmul twice differentiable in x)
    g32 = torch.randn(3, n, requires_grad=True)
    r = torch.randn(3, k)
    (transposed(g32, qw, "auto") * r).sum().backward()
    close(g32.grad, r @ spec_weight(qw).T, torch.float32, "grad of the transposed op")


def test_lora_backward_formulas_against_autograd_of_the_float_layer():
    """fp32, CPU kernels: grads equal autograd through the dequantized float math."""
    qw = WEIGHTS["nf4_b64"]()
    n, k = qw.shape
    w = spec_weight(qw)
    gen = torch.Generator().manual_seed(2)
    x, A, B = torch.randn(2, 7, k, generator=gen), torch.randn(8, k, generator=gen), torch.randn(n, 8, generator=gen)
    bias = torch.randn(n, generator=gen)
    gy = torch.randn(2, 7, n, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, bias)]
    y, _ = lora(*leaves[:1], qw, leaves[1], leaves[2], 0.5, leaves[3], "cpu")
    y.backward(gy)
    ref_leaves = [t.double().requires_grad_() for t in (x, A, B, bias)]
    xr, Ar, Br, br = ref_leaves
    (xr @ w.double().T + 0.5 * (xr @ Ar.T) @ Br.T + br).backward(gy.double())
    for got, want, name in zip(leaves, ref_leaves, ("x", "A", "B", "bias")):
        close(got.grad, want.grad.float(), torch.float32, f"grad {name}")


# --- kernels against the spec -----------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("level", ["scalar", "best"])
@pytest.mark.parametrize("name", CPU_WEIGHTS)
@pytest.mark.parametrize("m", [1, 7, 20])
def test_cpu_transposed_matches_spec(monkeypatch, name, m, level):
    """m = 1, 7: the streaming kernel; 20: the tiled kernel (Int / NF4 at the best
    level), else (the scalar level, GGUF) panels from PANEL_MIN_M = 16 rows,
    several of them."""
    qw = WEIGHTS[name]()
    n, k = qw.shape
    monkeypatch.setattr(cpu_lora, "PANEL_BYTES", 4 * n * 64)  # 64-column panels: several, a ragged last one
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(m))
    with simd(level):
        out = transposed(g, qw, "cpu")
    close(out, transposed(g, qw, "reference"), torch.float32, f"{name} m={m} {level}")


@needs_ext
@pytest.mark.parametrize("level", _ext.simd_levels() or ["scalar"])
@pytest.mark.parametrize("name", ["int4_g32_actorder_tall", "nf4_b64_odd_tall"])
def test_cpu_transposed_tiled_blocks(name, level):
    """The tiled form at every SIMD level (ymm strips at avx2 / avxvnni, zmm at
    avx512): 259 rows of g (two blocks, a 3-row last group), 300 weight rows
    (two steps of 256), K = 200 (two 96-column items and an 8-column one)."""
    qw = {"int4_g32_actorder_tall": lambda: int_qw(4, 32, act_order=True, n=300, k=200),
          "nf4_b64_odd_tall": lambda: rtn_qw(NF4(64), 300, 201)}[name]()
    g = torch.randn(259, qw.shape[0], generator=torch.Generator().manual_seed(5))
    with simd(level):
        out = transposed(g, qw, "cpu")
    close(out, transposed(g, qw, "reference"), torch.float32, f"{name} {level}")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [3, 40])
@pytest.mark.parametrize("name", ["int4_g32", "nf4_b32_dq_ragged", "gguf_q4_0"])
def test_cpu_transposed_half_precision(name, m, dtype):
    qw = WEIGHTS[name]()
    g = torch.randn(m, qw.shape[0]).to(dtype)
    close(transposed(g, qw, "cpu"), transposed(g, qw, "reference"), dtype, f"{name} {dtype} m={m}")


@needs_ext
@pytest.mark.parametrize("level", ["scalar", "best"])
@pytest.mark.parametrize("name", [w for w in CPU_WEIGHTS if not w.startswith("gguf")])
@pytest.mark.parametrize("panels", [False, True])
def test_cpu_transposed_decode_is_bit_exact(monkeypatch, name, panels, level):
    """A one-hot g picks weight rows: both CPU strategies reproduce the spec's decode exactly."""
    qw = WEIGHTS[name]()
    n, k = qw.shape
    monkeypatch.setattr(cpu_lora, "PANEL_MIN_M", 0 if panels else 1 << 30)
    monkeypatch.setattr(cpu_lora, "PANEL_BYTES", 4 * n * 96)
    rows = torch.arange(n).flip(0)[: min(n, 11)]
    g = torch.nn.functional.one_hot(rows, n).float()
    with simd(level):
        out = transposed(g, qw, "cpu")
    assert torch.equal(out, spec_weight(qw)[rows]), name


def test_panels_never_hold_the_whole_weight():
    assert cpu_lora.panel_extent(4096, 4096, 32) == 512
    assert cpu_lora.panel_extent(64, 256, 32) == 64  # a quarter of the columns at most
    assert cpu_lora.panel_extent(4096, 11008, 16) * 4096 * 4 <= cpu_lora.PANEL_BYTES


@needs_ext
@pytest.mark.parametrize("name", CPU_WEIGHTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("panels", [False, True], ids=["kernel", "panels"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_cpu_lora_qmatmul_matches_spec(monkeypatch, name, dtype, panels, with_bias):
    """panels: the row-panel forward (FORWARD_PANEL_MIN_M rows on; NF4, and Int
    in bf16, act_order included) with 7-row panels, a ragged last one; kernel
    (and GGUF, Int fp32 with either id): the C++ qmatmul + the low-rank addmm_."""
    qw = WEIGHTS[name]()
    n, k = qw.shape
    monkeypatch.setattr(cpu_lora, "FORWARD_PANEL_MIN_M", 0 if panels else 1 << 30)
    monkeypatch.setattr(cpu_lora, "ROW_PANEL_FLOATS", 7 * k)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, k, generator=gen).to(dtype)
    A, B = (torch.randn(5, k, generator=gen) * 0.1).to(dtype), (torch.randn(n, 5, generator=gen) * 0.1).to(dtype)
    bias = torch.randn(n, generator=gen) if with_bias else None
    y, xa = lora(x, qw, A, B, 2.0, bias, "cpu")
    y_ref, xa_ref = lora(x, qw, A, B, 2.0, bias, "reference")
    assert torch.equal(xa, xa_ref) and xa.shape == (2, 9, 5)
    close(y, y_ref, dtype, f"{name} {dtype}")


@needs_ext
@pytest.mark.parametrize("level", _ext.simd_levels() or ["scalar"])
@pytest.mark.parametrize("name", ["int4_g64_actorder", "nf4_b32_dq_ragged"])
@pytest.mark.parametrize("rank", [1, 8, 13, 24])
@pytest.mark.parametrize("m", [3, 9, 300], ids=["gemv", "gemm", "gemm_two_blocks"])
def test_cpu_lora_epilogue_every_rank(name, rank, m, level):
    """The C++ kernels' low-rank epilogue (fp32, no panels) at ranks with and
    without a tail past a multiple of 8, on the GEMV / fused and the tiled
    kernels (300 rows: two blocks of x), the scalar and the vector epilogue."""
    qw = WEIGHTS[name]()
    n, k = qw.shape
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(m, k, generator=gen)
    A, B = torch.randn(rank, k, generator=gen) * 0.1, torch.randn(n, rank, generator=gen) * 0.1
    with simd(level):
        y, _ = lora(x, qw, A, B, 1.5, None, "cpu")
    y_ref, _ = lora(x, qw, A, B, 1.5, None, "reference")
    close(y, y_ref, torch.float32, f"{name} r={rank} m={m} {level}")


@needs_ext
def test_dispatch_picks_the_cpu_kernels_and_qmatmul_backward_uses_the_transposed_op(monkeypatch):
    qw = WEIGHTS["int4_g32"]()
    fmt = qw.format
    assert select_kernel("qmatmul_transposed", fmt, torch.device("cpu"), 8).name == "cpu_int_qmatmul_transposed"
    assert select_kernel("lora_qmatmul", fmt, torch.device("cpu"), 8).name == "cpu_int_lora_qmatmul"
    calls = []
    original = cpu_lora.int_qmatmul_transposed
    swap_kernel(monkeypatch, "cpu_int_qmatmul_transposed", lambda *a: calls.append(1) or original(*a))
    swap_kernel(monkeypatch, "cpu_int_dequantize", lambda *a, **kw: pytest.fail("the backward dequantized the weight"))
    x = torch.randn(4, qw.shape[1], requires_grad=True)
    pyquant.qmatmul(x, qw).sum().backward()
    assert calls == [1]
    close(x.grad, torch.ones(4, qw.shape[0]) @ spec_weight(qw), torch.float32, "qmatmul grad_x")


def test_backward_of_a_forced_forward_keeps_its_kernel_or_falls_back():
    from types import SimpleNamespace

    from pyquant.ops.library import _backward_kernel

    qw = WEIGHTS["nf4_b64"]()
    g = torch.randn(3, qw.shape[0])
    ctx = SimpleNamespace(fmt=qw.format.spec(), n=qw.shape[0], kernel="reference")
    assert _backward_kernel(ctx, g) == "reference"
    ctx.kernel = "cuda"  # a forward forced onto CUDA C++: no transposed kernel there
    assert _backward_kernel(ctx, g) == "auto"
    with pytest.raises(KernelUnavailableError):
        transposed(g, qw, "cuda")


@needs_ext
@pytest.mark.parametrize("m", [3, 40])
@pytest.mark.parametrize("name", ["int4_g32", "nf4_b32_dq_ragged", "gguf_q4_0"])
def test_cpu_transposed_fp64_is_computed_in_fp64(name, m):
    """As the reference: gradient checks feed fp64 and compare to the last bits."""
    qw = WEIGHTS[name]()
    g = torch.randn(m, qw.shape[0], dtype=torch.float64)
    want = g @ pyquant.dequantize(qw, kernel="reference").double()
    got = transposed(g, qw, "cpu")
    assert got.dtype == torch.float64
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())


@pytest.mark.parametrize("kernel", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_ops_name_a_wrong_shape(kernel):
    qw = WEIGHTS["int4_g32"]()
    n, k = qw.shape
    with pytest.raises(ShapeError, match=rf"grad has shape \(3, {n + 1}\).*out_features={n}"):
        transposed(torch.randn(3, n + 1), qw, kernel)
    with pytest.raises(ShapeError, match=rf"x has shape \(3, {k - 1}\).*in_features={k}"):
        lora(torch.randn(3, k - 1), qw, torch.randn(2, k), torch.randn(n, 2), 1.0, None, kernel)
    with pytest.raises(ShapeError, match=rf"lora_A must be \(r, in_features={k}\), got shape \(2, {k - 1}\)"):
        lora(torch.randn(3, k), qw, torch.randn(2, k - 1), torch.randn(n, 2), 1.0, None, kernel)
    with pytest.raises(ShapeError, match="x_lora"):
        lora(torch.randn(3, k), qw, torch.randn(2, k), torch.randn(n, 2), 1.0, None, kernel, x_lora=torch.randn(3, 5))


def test_empty_inputs():
    qw = WEIGHTS["int4_g32"]()
    n, k = qw.shape
    assert transposed(torch.empty(0, n), qw, "auto").shape == (0, k)
    y, xa = lora(torch.empty(0, k), qw, torch.randn(2, k), torch.randn(n, 2), 1.0, None, "auto")
    assert y.shape == (0, n) and xa.shape == (0, 2)


@pytest.mark.parametrize("kernel", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_opcheck(kernel):
    qw = WEIGHTS["nf4_b32_dq_ragged"]()
    n, k = qw.shape
    spec = qw.format.spec()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, k, generator=gen, requires_grad=True)
    A = torch.randn(4, k, generator=gen, requires_grad=True)
    B = torch.randn(n, 4, generator=gen, requires_grad=True)
    bias = torch.randn(n, generator=gen, requires_grad=True)
    xl = torch.randn(3, k, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.pyquant.lora_qmatmul.default,
                          (x, qw.tensor_list(), spec, n, k, bias, A, B, 0.5, None, kernel))
    torch.library.opcheck(torch.ops.pyquant.lora_qmatmul.default,
                          (x, qw.tensor_list(), spec, n, k, None, A, B, 0.5, xl, kernel))
    g = torch.randn(5, n, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.pyquant.qmatmul_transposed.default, (g, qw.tensor_list(), spec, n, k, kernel))


# --- Triton: under the interpreter on the CPU, on the GPU in gpu_check.sh ------------------------
TRITON_WEIGHTS = ["int4_g32", "int3_g64_sym_bf16", "int8_pc_fp32", "int4_g64_actorder", "nf4_b32_dq_ragged",
                  "gguf_q4_0"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def triton_case(name, dtype, seed):
    qw = WEIGHTS[name]().to(DEVICE)
    gen = torch.Generator().manual_seed(seed)
    n, k = qw.shape
    m = 37  # two row tiles of 32, ragged

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    return qw, n, k, m, rand


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", TRITON_WEIGHTS)
def test_triton_any_qmatmul_transposed_matches_spec(name, dtype):
    qw, n, k, m, rand = triton_case(name, dtype, 5)
    g = rand(m, n)
    close(transposed(g, qw, "triton"), transposed(g, qw, "reference"), dtype, f"transposed {name}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", TRITON_WEIGHTS)
def test_triton_any_lora_qmatmul_matches_spec(name, dtype):
    qw, n, k, m, rand = triton_case(name, dtype, 6)
    x, A, B = rand(m, k), rand(3, k), rand(n, 3)
    bias = torch.randn(n).to(DEVICE)
    y, _ = lora(x, qw, A, B, 0.25, bias, "triton")
    close(y, lora(x, qw, A, B, 0.25, bias, "reference")[0], dtype, f"lora {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [Int(4, 64), NF4(64)], ids=["int4_g64", "nf4_b64"])
def test_triton_any_lora_qmatmul_layer_memory_on_gpu(fmt):
    """A QLoRA layer forced onto the Triton kernels: forward + backward peak stays
    below the bf16 weight (torch.cuda.max_memory_allocated)."""
    n = k = 4096
    base = pyquant.QuantLinear(rtn_qw(fmt, n, k).to("cuda"), kernel="triton")
    layer = pyquant.LoRALinear(base, r=16, alpha=32)
    x = torch.randn(512, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    layer(x).sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - start < n * k * 2


# --- memory: no N x K float tensor in one layer's forward + backward -------------------------
def allocations(fn, tmp_path):
    """(peak bytes, largest single allocation) of the CPU allocator while fn() runs:
    the profiler's memory events carry the allocator's running total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    assert events, "the profiler recorded no allocation"
    return (max(e["args"]["Total Allocated"] for e in events),
            max(e["args"]["Bytes"] for e in events))


@needs_ext
@pytest.mark.parametrize("fmt", [Int(4, 64), NF4(64)], ids=["int4_g64", "nf4_b64"])
@pytest.mark.parametrize("m", [8, 64, 256], ids=["streaming", "tiled", "m256"])
def test_layer_forward_backward_never_holds_a_float_weight(tmp_path, fmt, m):
    n = k = 1024
    weight_bytes = n * k * 4
    base = pyquant.QuantLinear(rtn_qw(fmt, n, k))
    layer = pyquant.LoRALinear(base, r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(m, k, requires_grad=True)

    def step():
        layer(x).sum().backward()

    step()  # first-call costs (lazy loads) outside the measurement
    peak, largest = allocations(step, tmp_path)
    assert largest < weight_bytes // 2, f"an allocation of {largest} bytes (weight in fp32: {weight_bytes})"
    # m = 256: y, grad_y and grad_x alone hold 3 MiB (3/4 of the fp32 weight), so the bound is
    # the weight itself: a float N x K tensor on top of them would exceed it
    limit = weight_bytes // 2 if m <= 64 else weight_bytes
    assert peak < limit, f"peak {peak} bytes (weight in fp32: {weight_bytes})"
    # control: the measurement sees a dequantized weight
    _, control = allocations(lambda: base.dequantized_weight(), tmp_path)
    assert control >= weight_bytes
