"""y in the dtype of half-precision x, written by the C++ entry points
(csrc/cpu/half_output.h): the fp32 result rounded to nearest even exactly as
torch's Tensor.to does, at every SIMD level this CPU has, and what the GGUF, Int
and NF4 entry points return for fp16 / bf16 y is their fp32 y so rounded."""
import pytest
import torch

import pyquant
from pyquant import _ext
from pyquant.formats import GGUF, NF4, Int
from pyquant.ops._dtypes import dtype_code, ptr

C = _ext.load()
pytestmark = pytest.mark.skipif(C is None, reason="the C++ extension is not built")
HALF = [torch.float16, torch.bfloat16]


def _hard_values() -> torch.Tensor:
    """Ties, the last finite values before overflow, subnormals of both formats,
    infinities, and every 16th of all bit patterns of some exponents (no NaN)."""
    torch.manual_seed(0)
    edge = torch.tensor([0.0, -0.0, 1.0, -2.5, 65504.0, 65519.0, 65520.0, -65520.0, 6.1e-5, 6.0e-5, 5.96e-8, 2.98e-8,
                         2.99e-8, 1e-8, 3.3895e38, 3.4028e38, 1e-40, -1e-45, float("inf"), -float("inf")])
    ties = torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11])
    bits = torch.arange(0x30000000, 0x48000000, 0x10001, dtype=torch.int64).to(torch.int32).view(torch.float32)
    return torch.cat([edge, ties, -ties, bits, -bits, torch.randn(5000) * 300])


@pytest.mark.parametrize("level", _ext.simd_levels())
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("count,threads", [(0, 1), (1, 1), (7, 1), (9, 2), (None, 1), ((1 << 17) + 13, 2)])
def test_store_fp32_as_rounds_as_torch(level, dtype, count, threads):
    src = _hard_values()
    if count is not None:  # long: several 64 Ki blocks, shared among threads
        src = src.repeat(count // src.numel() + 1)[:count].contiguous()
    dst = torch.full(src.shape, 7, dtype=dtype)
    with _ext.cpu_simd(level):
        C.store_fp32_as(dtype_code(dtype), src.data_ptr(), dst.data_ptr(), src.numel(), threads)
    want = src.to(dtype)
    assert torch.equal(dst.view(torch.int16), want.view(torch.int16)), (level, dtype, count)


@pytest.mark.parametrize("dtype", HALF)
def test_store_fp32_as_keeps_nan_and_names_a_bad_dtype(dtype):
    src = torch.tensor([float("nan"), -float("nan"), 1.0])
    dst = torch.zeros(3, dtype=dtype)
    C.store_fp32_as(dtype_code(dtype), src.data_ptr(), dst.data_ptr(), 3, 1)
    assert dst[:2].isnan().all() and dst[2] == 1
    with pytest.raises(ValueError, match="got 0"):
        C.store_fp32_as(0, src.data_ptr(), dst.data_ptr(), 3, 1)


def _entry_call(fmt, int8: bool):
    """The format's C++ qmatmul entry point, for x (M, K) and y of any dtype."""
    torch.manual_seed(1)
    n, k = 40, 256
    qw = pyquant.quantize_weight(torch.randn(n, k), fmt)
    t = qw.tensors
    if isinstance(fmt, GGUF):
        blocks = qw.tensor_list()[0]
        return n, k, lambda x, y, bias: C.gguf_qmatmul(
            fmt.block.ggml_type, x.data_ptr(), blocks.data_ptr(), bias.data_ptr(), y.data_ptr(), x.shape[0], n, k, 2,
            int8, dtype_code(x.dtype), dtype_code(y.dtype))
    if isinstance(fmt, Int):
        return n, k, lambda x, y, bias: C.int_qmatmul(
            x.data_ptr(), dtype_code(x.dtype), x.shape[0], t["qweight"].data_ptr(), t["scales"].data_ptr(),
            ptr(t.get("zeros")), bias.data_ptr(), n, k, fmt.bits, fmt.group_size, dtype_code(fmt.scale_dtype),
            y.data_ptr(), 2, int8_activations=int8, y_dtype=dtype_code(y.dtype))
    from pyquant.ops.backends.cpu_nf4 import _weight_args

    args, keep = _weight_args(qw.tensor_list(), fmt, (n, k))
    return n, k, lambda x, y, bias: (keep, C.nf4_qmatmul(
        x.data_ptr(), x.shape[0], *args, n, k, fmt.block_size, bias.data_ptr(), y.data_ptr(), 2,
        int8_activations=int8, x_dtype=dtype_code(x.dtype), y_dtype=dtype_code(y.dtype)))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("fmt,int8", [(GGUF("Q4_K"), True), (GGUF("Q8_0"), True), (Int(4, 128, False), True),
                                      (Int(4, 128, False), False), (Int(3, 64, True), True), (NF4(), True),
                                      (NF4(), False)], ids=["q4_k", "q8_0", "int4", "int4_exact", "int3", "nf4",
                                                            "nf4_exact"])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_entry_points_write_half_y_as_their_fp32_y_rounded(fmt, int8, dtype, m):
    n, k, call = _entry_call(fmt, int8)
    x = (torch.randn(m, k) * 4).to(dtype if int8 or isinstance(fmt, Int) else torch.float32)
    bias = torch.randn(n)
    y32, y = torch.empty(m, n), torch.full((m, n), 3, dtype=dtype)
    call(x, y32, bias)
    call(x, y, bias)
    assert torch.equal(y.view(torch.int16), y32.to(dtype).view(torch.int16)), (fmt.spec(), int8, m)


def test_entry_point_names_a_bad_y_dtype():
    n, k, call = _entry_call(GGUF("Q4_0"), True)
    with pytest.raises(ValueError, match="y_dtype must be .* got 5"):
        C.gguf_qmatmul(2, torch.randn(1, k).data_ptr(), 0, 0, 0, 1, n, k, 1, True, 0, 5)
