"""QuantLinear models under CUDA graphs and torch.compile(mode="reduce-overhead"), and
the eager launch plans on a GPU (run by benchmarks/gpu_check.sh).

Test names follow benchmarks/verified.py's rule: ``test_<kernel>_...`` for the kernel
whose plan or launches they exercise.
"""
import pytest
import torch
from torch import nn

import pyquant
from pyquant.formats import Int

pytestmark = pytest.mark.gpu


def _model(kernel: str, dtype=torch.float16, seed=0):
    torch.manual_seed(seed)
    layers = []
    for n, k in ((256, 512), (512, 256), (128, 512)):
        lin = nn.Linear(k, n)
        layers += [pyquant.QuantLinear.from_linear(lin, Int(4, 128, False, torch.float16), kernel=kernel), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to("cuda", dtype)


def _graph_replays_like_eager(kernel: str, m: int):
    model = _model(kernel)
    static_x = torch.randn(m, 512, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        model(static_x)  # plans built and first-use tables made outside the capture
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s), torch.cuda.graph(graph):
            static_y = model(static_x)
        torch.cuda.current_stream().wait_stream(s)
        for seed in range(3):
            g = torch.Generator(device="cuda").manual_seed(seed)
            static_x.copy_(torch.randn(m, 512, device="cuda", generator=g))
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(static_y, model(static_x), rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 4])
def test_cuda_int4_qmatmul_gemv_quant_linear_model_cuda_graph(m):
    _graph_replays_like_eager("cuda", m)


def test_triton_any_qmatmul_gemv_quant_linear_model_cuda_graph():
    _graph_replays_like_eager("triton", 1)


def test_triton_any_qmatmul_splitk_quant_linear_model_cuda_graph():
    _graph_replays_like_eager("triton", 16)


def test_triton_any_qmatmul_gemm_quant_linear_model_cuda_graph():
    _graph_replays_like_eager("triton", 128)


def test_cuda_int4_qmatmul_gemv_quant_linear_model_compile_reduce_overhead():
    model = _model("cuda")
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for seed in range(4):  # cudagraph trees record on the first calls, replay after
            g = torch.Generator(device="cuda").manual_seed(seed)
            x = torch.randn(2, 512, device="cuda", generator=g, dtype=torch.float16)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-3, atol=1e-3)


def test_cuda_int4_qmatmul_gemv_plan_is_rebuilt_for_new_tensors():
    lin = _model("cuda")[0]
    x = torch.randn(3, 512, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        y0 = lin(x)
        lin.scales.mul_(2)  # in place: same pointers, the plan reads the new values
        torch.testing.assert_close(lin(x) - lin.bias, 2 * (y0 - lin.bias), rtol=1e-2, atol=1e-2)
        lin.to("cpu")  # new tensors on another device: the CUDA plan must not be used
        assert lin(x.cpu().float()).device.type == "cpu"


def _direct_launch_matches_first_launch(m):
    # the first call of a plan entry goes through the JIT, later ones to the compiled kernel
    torch.manual_seed(0)
    qw = pyquant.quantize_weight(torch.randn(320, 1024), Int(4, 128, False, torch.float16)).to("cuda")
    x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
    bias = torch.randn(320, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        first = pyquant.qmatmul(x, qw, bias, kernel="triton")
        again = pyquant.qmatmul(x, qw, bias, kernel="triton")
        ref = pyquant.qmatmul(x, qw, bias, kernel="reference")
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(first, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("m", [1, 3])
def test_triton_any_qmatmul_gemv_plan_direct_launch(m):
    _direct_launch_matches_first_launch(m)


def test_triton_any_qmatmul_splitk_plan_direct_launch():
    _direct_launch_matches_first_launch(16)


def test_triton_any_qmatmul_gemm_plan_direct_launch():
    _direct_launch_matches_first_launch(100)
