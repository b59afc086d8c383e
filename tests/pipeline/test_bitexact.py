"""quantize_model's layers are exactly what the per-layer functions give on the
same weights (and, for GPTQ, the same Hessians): a pipeline that changed a
weight, a format or an option on the way would fail here, not only in quality."""
import copy

import pytest
import torch
from torch import nn

import pyquant
from pyquant import GGUF, NF4, Int, QuantConfig
from pyquant.algorithms.gptq import gptq_quantize
from pyquant.algorithms.hessian import HessianAccumulator
from tests.pipeline.models import fast_config, tiny_model, token_ids

# llama.cpp's types for rows that are not whole 256-weight super-blocks, spelled out here
# rather than read from pyquant.
LLAMA_CPP_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def mlp(seed=0):
    """in_features 256 (whole k-quant super-blocks) and 320 (k-quants fall back)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 320), nn.ReLU(), nn.Linear(320, 256, bias=False), nn.Linear(256, 64))


def expected_format(cfg_kw, method, k):
    if method in ("rtn", "hqq"):
        return Int(cfg_kw.get("bits", 4), cfg_kw["group_size"], cfg_kw.get("symmetric", False))
    if method == "nf4":
        return NF4(cfg_kw["group_size"], cfg_kw.get("nf4_double_quant", False))
    t = method.upper()
    return GGUF(LLAMA_CPP_FALLBACK[t] if t.endswith("_K") and k % 256 else t)


CASES = [
    ("rtn", dict(bits=4, group_size=32), {}),
    ("rtn", dict(bits=3, group_size=64, symmetric=True), {}),
    ("rtn", dict(bits=8, group_size=-1), {}),
    ("hqq", dict(bits=4, group_size=64), dict(zero_point="anchored")),
    ("hqq", dict(bits=3, group_size=32, hqq_zero_point="float"), dict(zero_point="float")),
    ("hqq", dict(bits=4, group_size=64, hqq_zero_point="integer", method_kwargs=dict(iters=5)),
     dict(zero_point="integer", iters=5)),
    ("nf4", dict(group_size=64), {}),
    ("nf4", dict(group_size=128, nf4_double_quant=True), {}),
] + [(t.lower(), {}, {}) for t in pyquant.formats.BLOCK_TYPES]


def case_id(case):
    method, cfg_kw, _ = case
    return "-".join([method] + [f"{k}={v}" for k, v in cfg_kw.items()])


@pytest.mark.parametrize("method,cfg_kw,options", CASES, ids=[case_id(c) for c in CASES])
def test_calibration_free_layers_equal_quantize_weight(method, cfg_kw, options):
    model = mlp()
    float_model = copy.deepcopy(model)
    report = pyquant.quantize_model(model, QuantConfig(method, **cfg_kw), None, filter=lambda n, m: True,
                                    progress=False, verbose=False)
    layers = {n: m for n, m in float_model.named_modules() if isinstance(m, nn.Linear)}
    assert [r.name for r in report] == list(layers)
    for name, lin in layers.items():
        fmt = expected_format(cfg_kw, method, lin.in_features)
        want = pyquant.quantize_weight(lin.weight, fmt, method, **options)
        got = model.get_submodule(name)
        assert got.qformat == fmt, (name, got.qformat, fmt)
        for t in want.tensors:
            assert torch.equal(got.quantized_weight.tensors[t], want.tensors[t]), f"{name}.{t} differs ({method})"
        bias = lin.bias
        assert (got.bias is None) == (bias is None) and (bias is None or torch.equal(got.bias, bias))


def test_plain_layers_of_a_real_model_equal_quantize_weight():
    base = tiny_model("qwen2")  # q/k/v with biases
    model = copy.deepcopy(base)
    pyquant.quantize_model(model, QuantConfig("hqq", bits=4, group_size=32), None, progress=False, verbose=False)
    for name, lin in base.named_modules():
        if isinstance(lin, nn.Linear) and name != "lm_head":
            want = pyquant.quantize_weight(lin.weight, Int(4, 32), "hqq")
            got = model.get_submodule(name).quantized_weight
            assert all(torch.equal(got.tensors[t], want.tensors[t]) for t in want.tensors), name


# Llama's groups of linears sharing one input, in execution order.
LLAMA_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def hessian_of(model, layer_name, batches):
    """2/n X^T X of ``layer_name``'s inputs over the calibration batches (the model run whole)."""
    layer = model.get_submodule(layer_name)
    acc = HessianAccumulator(layer.in_features)
    handle = layer.register_forward_pre_hook(lambda m, a: acc.add(a[0]))
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b, use_cache=False)
    finally:
        handle.remove()
    return acc.hessian()


@pytest.mark.parametrize("true_sequential", [True, False])
def test_gptq_layers_equal_gptq_quantize_on_the_captured_hessian(true_sequential):
    base = tiny_model("llama")
    calib = token_ids(16)
    cfg = fast_config("gptq", bits=4, group_size=32, true_sequential=true_sequential)
    quantized = copy.deepcopy(base)
    pyquant.quantize_model(quantized, cfg, calib, progress=False, verbose=False)
    batches = list(calib.split(cfg.batch_size))
    fmt = Int(4, 32, act_order=True)
    done = []  # layers quantized before the group at hand
    for block in (0, 1):
        for group in LLAMA_GROUPS:
            names = [f"model.layers.{block}.{n}" for n in group]
            # The model as the pipeline ran it for this group: earlier blocks quantized, and with
            # true-sequential the block's earlier groups too.
            seen = copy.deepcopy(base)
            earlier = done if true_sequential else [n for n in done if not n.startswith(f"model.layers.{block}.")]
            for n in earlier:
                parent, _, leaf = n.rpartition(".")
                setattr(seen.get_submodule(parent), leaf, quantized.get_submodule(n))
            H = hessian_of(seen, names[0], batches)
            for n in names:
                want = gptq_quantize(base.get_submodule(n).weight, H, fmt, damp=cfg.damp, block_size=cfg.block_size,
                                     static_groups=True, clip="mse", clip_grid=cfg.clip_grid,
                                     clip_max_shrink=cfg.clip_max_shrink, order="natural",
                                     refit="scale_zero").qweight
                got = quantized.get_submodule(n).quantized_weight
                for t in want.tensors:
                    assert torch.equal(got.tensors[t], want.tensors[t]), f"{n}.{t} differs"
            done += names
