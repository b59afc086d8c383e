"""pyquant the way a server uses it: the torch.library ops called directly, a QuantLinear model under
torch.compile(fullgraph=True) and CUDA graphs, worker threads racing the first calls, and
bit-identical results run to run on every CPU kernel."""
import dataclasses

import pytest
import torch
from torch import nn

import pyquant
from pyquant.formats import GGUF, NF4, Int, QuantizedWeight
from pyquant.nn import QuantLinear
from pyquant.ops import dispatch
from tests.isolated_python import run_python

SERVED_FORMATS = [Int(4, 128, False), Int(8, -1, True), NF4(64), GGUF("Q4_0"), GGUF("Q4_K")]


def served_model(seed=0):
    """A small MLP whose layers use the formats a server meets."""
    torch.manual_seed(seed)
    layers = []
    for fmt in SERVED_FORMATS:
        layers += [QuantLinear.from_linear(nn.Linear(256, 256), fmt), nn.SiLU()]
    return nn.Sequential(*layers).eval()


def test_ops_called_directly_match_the_python_api():
    qw = pyquant.quantize_weight(torch.randn(96, 256), Int(4, 128, False))
    x, bias = torch.randn(3, 256), torch.randn(96)
    spec, (n, k) = qw.format.spec(), qw.shape
    y = torch.ops.pyquant.qmatmul(x, qw.tensor_list(), spec, n, k, bias, "auto")
    assert torch.equal(y, pyquant.qmatmul(x, qw, bias))
    w = torch.ops.pyquant.dequantize(qw.tensor_list(), spec, n, k, torch.float32, "auto")
    assert torch.equal(w, qw.dequantize(torch.float32))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_model_under_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    model = served_model()
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=True)
    with torch.no_grad():
        for m in (1, 5, 17):  # decode and prefill batches: one graph, no break
            x = torch.randn(m, 256)
            eager = model(x)
            out = compiled(x)
            # the pyquant op is opaque to the compiler: the same kernel runs
            torch.testing.assert_close(out, eager, rtol=0, atol=1e-5 if backend == "inductor" else 0)


@pytest.mark.gpu
def test_model_under_cuda_graphs():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = served_model().cuda().half()
    static_x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: kernel selection and caches outside the capture
            for _ in range(3):
                model(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = model(static_x)
        for seed in range(3):
            x = torch.randn(4, 256, device="cuda", dtype=torch.float16, generator=None)
            static_x.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_y, model(x))


def test_eight_threads_give_the_single_threaded_results():
    """A fresh interpreter, so the threads race the first-call kernel selection, the extension
    load and every cache; 8 threads for a bounded time, every result compared bit for bit."""
    r = run_python(
        """
        import threading, time, torch, pyquant
        from tests.test_serving import served_model, SERVED_FORMATS

        torch.manual_seed(0)
        weights = [pyquant.quantize_weight(torch.randn(64, 256), f) for f in SERVED_FORMATS]
        model = served_model()
        inputs = [torch.randn(m, 256) for m in (1, 3, 16)]

        def work():
            out = [pyquant.qmatmul(x, qw) for qw in weights for x in inputs]
            with torch.no_grad():
                out += [model(x) for x in inputs]
            return out

        results, errors, start = [[] for _ in range(8)], [], threading.Barrier(8)
        deadline = [None]

        def worker(i):
            try:
                start.wait()
                deadline[0] = deadline[0] or time.monotonic() + 3.0
                while True:
                    results[i].append(work())
                    if time.monotonic() > deadline[0]:
                        break
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a worker hung"
        assert not errors, errors
        expected = work()
        runs = [run for per_thread in results for run in per_thread]
        bad = sum(not all(torch.equal(a, b) for a, b in zip(run, expected)) for run in runs)
        print(len(runs), bad)
        """
    )
    assert r.returncode == 0, r.stderr[-3000:]
    runs, bad = (int(v) for v in r.stdout.split())
    assert runs >= 8 and bad == 0, f"{bad} of {runs} threaded runs differ from the single-threaded result"


# --- determinism: every kernel that runs on the CPU, twice on the same input ----------------
CPU_BACKENDS = ("cpu", "reference")  # "dequant" (dequantize then GEMM) serves accelerators only
WEIGHT_FORMATS = [
    Int(4, 32, False), Int(3, 64, True), Int(2, 32, False), Int(8, -1, True), Int(4, 32, False, act_order=True),
    NF4(64), *(GGUF(t) for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")),
]


def _weight(fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 512, generator=g)
    if getattr(fmt, "act_order", False):  # RTN has no column order: a plain weight plus a permutation
        plain = pyquant.quantize_weight(w, dataclasses.replace(fmt, act_order=False))
        perm = torch.randperm(512, generator=g).to(torch.int32)
        return QuantizedWeight(fmt, {**plain.tensors, "perm": perm}, plain.shape)
    return pyquant.quantize_weight(w, fmt)


def _weight_op_calls(op, backend, fmt):
    """Calls of a weight op with ``kernel=backend`` on ``fmt``, one per M the kernel takes."""
    qw = _weight(fmt)
    spec, (n, k), q = fmt.spec(), qw.shape, qw.tensor_list()
    g = torch.Generator().manual_seed(1)
    if op == "dequantize":
        return [lambda: torch.ops.pyquant.dequantize(q, spec, n, k, torch.float32, backend)]
    if op in ("qmatmul", "w8a8_matmul"):
        fn = getattr(torch.ops.pyquant, op)
        bias = torch.randn(n, generator=g)
        xs = [torch.randn(m, k, generator=g) for m in (1, 5, 64)]
        return [lambda x=x: fn(x, q, spec, n, k, bias, backend) for x in xs]
    if op == "lora_qmatmul":  # QLoRA forward; M on both sides of every CPU path switch
        bias = torch.randn(n, generator=g)
        lora_A, lora_B = torch.randn(8, k, generator=g), torch.randn(n, 8, generator=g)
        xs = [torch.randn(m, k, generator=g) for m in (1, 5, 64)]
        return [lambda x=x: torch.ops.pyquant.lora_qmatmul(x, q, spec, n, k, bias, lora_A, lora_B, 0.5, None, backend)
                for x in xs]
    if op == "qmatmul_transposed":  # QLoRA backward's g @ W_hat: the C++ kernel below PANEL_MIN_M rows, panels above
        gs = [torch.randn(m, n, generator=g) for m in (1, 5, 64)]
        return [lambda gy=gy: torch.ops.pyquant.qmatmul_transposed(gy, q, spec, n, k, backend) for gy in gs]
    if op == "unpack":
        return [lambda: torch.ops.pyquant.unpack(qw.tensors["qweight"], spec, n, k, backend)]
    if op == "pack":
        codes = pyquant.unpack(qw)
        return [lambda: torch.ops.pyquant.pack(codes, spec, backend)]
    raise AssertionError(op)


def _solver_calls(op, backend):
    g = torch.Generator().manual_seed(2)
    if op == "gptq_block_update":
        W = torch.randn(6, 40, generator=g)
        A = torch.randn(40, 40, generator=g)
        U = torch.linalg.cholesky(A @ A.T / 40 + torch.eye(40)).T.contiguous()
        scale, zero = torch.rand(6, 3, generator=g) * 0.2 + 0.05, torch.full((6, 3), 8.0)

        def update():
            w, codes, err = W.clone(), torch.empty(6, 40, dtype=torch.uint8), torch.empty(6, 40)
            torch.ops.pyquant.gptq_block_update(w, U, scale, zero, 0, 40, 16, 15, codes, err, backend)
            return w, codes, err
        return [update]
    w = torch.randn(5, 256, generator=g) * 0.05
    if op == "hqq_solve":
        return [lambda: torch.ops.pyquant.hqq_solve(w, 4, 32, torch.float16, 8, 0.7, 10.0, 1.01, True, backend)]
    if op == "hqq_solve_integer_zero":
        return [lambda: torch.ops.pyquant.hqq_solve_integer_zero(w, 3, 32, torch.float16, 0.1, 8, 0.7, 10.0, 1.01,
                                                                 True, backend)]
    if op == "kquant_quantize":
        return [lambda t=t: torch.ops.pyquant.kquant_quantize(w, t, None, backend) for t in ("Q4_K", "Q6_K", "Q3_K")]
    raise AssertionError(op)


def cpu_kernel_calls():
    """(kernel name, zero-arg call) for every registered kernel that takes CPU tensors."""
    cpu = torch.device("cpu")
    cases = []
    for kernel in dispatch.kernels():
        if kernel.backend not in CPU_BACKENDS:
            continue
        if kernel.op in ("gptq_block_update", "hqq_solve", "hqq_solve_integer_zero", "kquant_quantize"):
            if dispatch.select_kernel(kernel.op, None if kernel.op != "kquant_quantize" else GGUF("Q4_K"), cpu, 1,
                                      kernel.backend).name == kernel.name:
                cases += [(kernel.name, c) for c in _solver_calls(kernel.op, kernel.backend)]
            continue
        taken = [f for f in WEIGHT_FORMATS if kernel.supports(f, cpu, 1)]
        assert taken, f"no test format for kernel {kernel.name}"  # a new CPU kernel gets a format here
        for fmt in taken:
            if dispatch.select_kernel(kernel.op, fmt, cpu, 1, kernel.backend).name == kernel.name:
                cases += [(f"{kernel.name}[{fmt.spec()}]", c) for c in _weight_op_calls(kernel.op, kernel.backend, fmt)]
    return cases


def _flatten(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def test_every_cpu_kernel_is_bit_identical_run_to_run():
    cases = cpu_kernel_calls()
    names = {n.split("[")[0] for n, _ in cases}
    expected = {k.name for k in dispatch.kernels() if k.backend == "reference" or
                (k.backend == "cpu" and pyquant.env()["cpu_cxx"])}
    assert expected <= names, f"kernels never exercised: {sorted(expected - names)}"
    differ = []
    for name, call in cases:
        first, second = _flatten(call()), _flatten(call())
        if not all(torch.equal(a, b) for a, b in zip(first, second)):
            differ.append(name)
    assert not differ, f"not bit-identical run to run: {differ}"
