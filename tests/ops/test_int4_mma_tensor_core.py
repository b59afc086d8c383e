"""CPU proof of the tensor-core int4 kernel's index maps (csrc/cuda/int4_mma.cu):

* the decode: every code of the mma layout lands, bit-exact, in the A-fragment
  register and half the PTX ISA assigns to its (row, column), scaled by the
  decoded value of code 1 that the kernel's extra mma uses for the group sums;
* the kernel: copies, zero-fills, swizzle, ldmatrix addresses, mma fragments,
  scale pairs, per-group folds, split-K partials and their reduction, output
  index, emulated lane by lane (tests/ops/int4_mma_emulation.py, constants read
  from the .cu source) and compared with the float64 reference;
* the pure-torch spec of the algorithm (pyquant/ops/reference/int4_mma.py) and
  the launch plan (pyquant/ops/backends/cuda_mma.py).
The GPU tests (tests/gpu/test_cuda_int4mma_qmatmul.py) remain the real check.
"""
import math

import numpy as np
import pytest
import torch

import pyquant
from pyquant.formats import Int, QuantizedWeight, to_mma
from pyquant.ops.backends import cuda_mma
from pyquant.ops.reference.int4_mma import int4_mma_qmatmul

from tests.ops import int4_mma_emulation as emu

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _w64(qw) -> torch.Tensor:
    """W_hat (logical column order) in float64 from the stored codes, scales and zeros."""
    n, k = qw.shape
    codes, scales, zeros = qw.format.unpack(qw)
    g = qw.format.group_size_for(k)
    z = zeros.double().repeat_interleave(g, 1)[:, :k]
    w = (codes.double() - z) * scales.double().repeat_interleave(g, 1)[:, :k]
    if qw.format.act_order:
        out = torch.empty_like(w)
        out[:, qw.tensors["perm"].long()] = w
        w = out
    return w


def _weight(n, k, group, sym=False, sdtype=torch.float16, seed=0, act_order=False):
    g = torch.Generator().manual_seed(seed)
    qw = pyquant.quantize_weight(torch.randn(n, k, generator=g), Int(4, group, sym, sdtype))
    if act_order:
        t = dict(qw.tensors, perm=torch.randperm(k, generator=g).to(torch.int32))
        qw = QuantizedWeight(Int(4, group, sym, sdtype, True), t, qw.shape)
    return qw


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_decode_puts_every_code_in_its_fragment_register(dtype):
    n, k = 40, 200
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    mma = to_mma(pyquant.Int(4, 64, True).pack(codes, torch.ones(n, 4)))
    packed = mma.tensors["qweight"].numpy()
    np_, kp = 48, 256
    padded = np.zeros((np_, kp))
    padded[:n, :k] = codes.numpy()
    dec = emu.decode_struct(dtype)
    one = emu.a_tile([[dec["kOneLo"], dec["kOneHi"], dec["kOneLo"], dec["kOneHi"]]] * 32, dtype)
    # the decoded code 1 is the row unit the fold divides out: kUnscale * one == 1 for every row
    assert np.all(one[:8] * dec["kUnscaleLo"] == 1.0) and np.all(one[8:] * dec["kUnscaleHi"] == 1.0)
    for tile in range(np_ // 16):
        for kb in range(kp // 64):
            for j in range(4):
                words = np.array([int.from_bytes(packed[tile, kb * 512 + l * 16 + 4 * j: kb * 512 + l * 16 + 4 * j + 4]
                                                 .tobytes(), "little") for l in range(32)], np.uint64)
                a = emu.a_tile(np.stack(emu.decode_word(words, dtype), axis=1), dtype)
                want = padded[16 * tile:16 * tile + 16, kb * 64 + 16 * j: kb * 64 + 16 * j + 16]
                # decoded = code * unit + offset * unit, exactly (no NaN: every register half written)
                np.testing.assert_array_equal(a, want * one + dec["kOffset"] * one)


def test_c_ternary_evaluator():
    assert emu.eval_c("2 <= 2 ? (8 >= 4 ? 4 : 2) : 2 == 4 ? 2 : 1") == 4
    assert emu.eval_c("4 <= 2 ? (8 >= 4 ? 4 : 2) : 4 == 4 ? 2 : 1") == 2
    assert emu.eval_c("8 <= 2 ? (2 >= 4 ? 4 : 2) : 8 == 4 ? 2 : 1") == 1


@pytest.mark.parametrize("m", [1, 3, 9, 17, 40])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_block_n_is_the_kernels(m, group):
    if group == 32 and m > cuda_mma.MAX_M_GROUP32:
        pytest.skip("not offered")
    mt = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
    fp = 2 if group == 32 else 4 if group == 64 else 8
    assert cuda_mma.block_n(m, group) == emu.const("kWarps") * 16 * emu.tiles_per_warp(mt, fp)
    assert cuda_mma.block_n(m, group) >= cuda_mma.MIN_BLOCK_N
    assert cuda_mma.STAGE_K == emu.const("kStageK")


CASES = [
    # n, k, group, sym, dtype, m, splits, act_order, bias
    (20, 300, 128, False, "fp16", 3, 1, False, True),   # ragged N and K (K % 8 != 0 -> padded x)
    (40, 520, 64, True, "bf16", 2, 2, False, False),    # two splits, ragged last split, g64 (2 periods/stage)
    (18, 264, 32, False, "fp16", 10, 3, False, True),   # g32 (4 periods per stage), two activation tiles
    (33, 384, -1, False, "bf16", 1, 1, True, False),    # per channel, act-order, 3 stages
    (70, 256, 128, True, "fp16", 20, 2, False, False),  # four activation tiles, ragged N over blocks
]


@pytest.mark.parametrize("n,k,group,sym,dtype,m,splits,act_order,bias", CASES)
def test_kernel_emulation_matches_the_reference(n, k, group, sym, dtype, m, splits, act_order, bias):
    torch.manual_seed(0)
    qw = _weight(n, k, group, sym, DTYPES[dtype], act_order=act_order)
    mma = to_mma(qw)
    x = torch.randn(m, k).to(DTYPES[dtype])
    b = torch.randn(n) if bias else None
    t = mma.tensors
    xk = cuda_mma._kernel_input(x, t).double().numpy()  # what the wrapper hands the kernel
    stages = math.ceil(xk.shape[1] / emu.const("kStageK"))
    assert math.ceil(stages / math.ceil(stages / splits)) == splits
    got = emu.emulate(xk, t["qweight"].numpy(), t["scales"].double().numpy(),
                      None if sym else t["zeros"].double().numpy(), n, group, dtype, splits,
                      None if b is None else b.double().numpy())
    w = _w64(qw)
    want = (x.double() @ w.T + (0 if b is None else b.double())).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n,k,group,sym,act_order", [(20, 300, 128, False, False), (33, 130, 32, True, True),
                                                     (16, 64, -1, False, False), (40, 255, 64, False, True)])
def test_dequantize_kernel_emulation_is_the_format_decode(n, k, group, sym, act_order):
    mma = to_mma(_weight(n, k, group, sym, torch.bfloat16, act_order=act_order))
    t = mma.tensors
    got = emu.emulate_dequant(t["qweight"].numpy(), t["scales"].double().numpy(),
                              None if sym else t["zeros"].double().numpy(),
                              t["perm"].numpy() if act_order else None, n, k, group)
    assert not np.isnan(got).any(), "an output the kernel never writes"
    np.testing.assert_array_equal(got, mma.format.decode(t, mma.shape).double().numpy())


@pytest.mark.parametrize("group,sym,act_order", [(128, False, False), (64, True, True), (-1, False, False)])
def test_algorithm_spec_equals_the_op_reference(group, sym, act_order):
    qw = _weight(50, 320, group, sym, torch.bfloat16, act_order=act_order)
    mma = to_mma(qw)
    x = torch.randn(5, 320)
    bias = torch.randn(50)
    got = int4_mma_qmatmul(x.double(), mma.tensor_list(), mma.format, mma.shape, bias)
    want = x.double() @ _w64(qw).T + bias.double()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (70, 300), (1, 8)])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_plan_splits_is_valid_and_fills_the_gpu(n, k, m):
    sms = 132
    s = cuda_mma.plan_splits(m, n, k, 128, sms)
    stages = math.ceil(k / cuda_mma.STAGE_K)
    assert 1 <= s <= stages and math.ceil(stages / math.ceil(stages / s)) == s
    assert s == 1 or 4 * s * m * n <= cuda_mma.WORKSPACE_BYTES
    assert s == 1 or stages / s >= cuda_mma.MIN_STAGES_PER_SPLIT
    blocks = math.ceil(n / cuda_mma.block_n(m, 128))
    if k >= 4096 and m <= 16:
        assert blocks * s >= sms, "every SM gets a CTA on the large shapes"


def test_kernel_input_pads_and_permutes():
    x = torch.arange(2 * 13, dtype=torch.float32).view(2, 13).half()
    perm = torch.tensor([3, 1, 0, 2, 4, 5, 6, 7, 8, 9, 10, 12, 11], dtype=torch.int32)
    xk = cuda_mma._kernel_input(x, {"perm": perm})
    assert xk.shape == (2, 16) and xk.data_ptr() % 16 == 0
    assert torch.equal(xk[:, :13], x[:, perm.long()]) and int(xk[:, 13:].abs().sum()) == 0
