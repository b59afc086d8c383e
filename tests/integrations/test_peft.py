"""pyquant.integrations.peft: peft's LoRA on QuantLinear layers through pyquant's
fused op, against peft's own LoRA on the dequantized float model; and a
QuantLinear model (add_lora) trained by the transformers Trainer."""
from __future__ import annotations

import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import pyquant  # noqa: E402
from pyquant import QuantLinear  # noqa: E402
from pyquant.errors import FormatError  # noqa: E402
from pyquant.formats import NF4, Int  # noqa: E402
from tests.deps import require  # noqa: E402

peft = require("peft")
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402

from pyquant.integrations.peft import QuantLoraLinear  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(64, 48)
        self.v_proj = nn.Linear(48, 64, bias=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.v_proj(torch.relu(self.q_proj(x)))))


def models(fmt):
    """(QuantLinear model, the float model with the same dequantized weights)."""
    torch.manual_seed(0)
    quant = Tiny()
    pyquant.replace_linear(quant, fmt, filter=lambda name, m: name in TARGETS)
    flt = Tiny()
    flt.load_state_dict({k: v for k, v in quant.state_dict().items() if k in flt.state_dict()}, strict=False)
    with torch.no_grad():
        for name in TARGETS:
            getattr(flt, name).weight.copy_(getattr(quant, name).dequantized_weight())
    return quant, flt


def peft_pair(fmt, **config):
    quant, flt = models(fmt)
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    cfg.update(config)
    pq, pf = get_peft_model(quant, LoraConfig(**cfg)), get_peft_model(flt, LoraConfig(**cfg))
    # identical adapters, B away from its zero init so every gradient is non-trivial
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pq.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                dict(pf.named_parameters())[name].copy_(p)
    return pq, pf


@pytest.mark.parametrize("fmt", [Int(4, 32), NF4(32)], ids=["int4", "nf4"])
def test_outputs_and_gradients_match_peft_on_the_float_model(monkeypatch, fmt):
    pq, pf = peft_pair(fmt)
    assert isinstance(pq.base_model.model.q_proj, QuantLoraLinear)
    calls = []
    op = torch.ops.pyquant.lora_qmatmul
    monkeypatch.setattr(torch.ops.pyquant, "lora_qmatmul", lambda *a: calls.append(1) or op(*a))
    x = torch.randn(2, 7, 64)
    yq, yf = pq(x), pf(x)
    assert len(calls) == 2  # both targets through the fused op
    torch.testing.assert_close(yq, yf, rtol=1e-5, atol=1e-5)
    yq.square().sum().backward()
    yf.square().sum().backward()
    grads_f = {n: p.grad for n, p in pf.named_parameters() if p.requires_grad}
    grads_q = {n: p.grad for n, p in pq.named_parameters() if p.requires_grad}
    assert grads_q.keys() == grads_f.keys() and any("lora_A" in n for n in grads_q)
    for name, g in grads_q.items():
        torch.testing.assert_close(g, grads_f[name], rtol=1e-4, atol=1e-5, msg=name)


def test_dropout_and_eval_mode():
    pq, pf = peft_pair(Int(4, 32), lora_dropout=0.3)
    x = torch.randn(4, 64)
    for m in (pq, pf):
        m.train()
    torch.manual_seed(5)
    yq = pq(x)
    torch.manual_seed(5)
    torch.testing.assert_close(yq, pf(x), rtol=1e-5, atol=1e-5)
    pq.eval()
    pf.eval()
    torch.testing.assert_close(pq(x), pf(x), rtol=1e-5, atol=1e-5)


def test_prepare_model_for_kbit_training_leaves_packed_buffers_alone():
    quant, _ = models(NF4(32))
    packed = {n: b.clone() for n, b in quant.named_buffers()}
    ptrs = {n: b.data_ptr() for n, b in quant.named_buffers()}
    quant = prepare_model_for_kbit_training(quant, use_gradient_checkpointing=False)
    model = get_peft_model(quant, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    buffers = dict(model.base_model.model.named_buffers())
    for name, before in packed.items():
        key = name.replace("q_proj.", "q_proj.base_layer.").replace("v_proj.", "v_proj.base_layer.")
        after = buffers[key]
        assert after.dtype == before.dtype and torch.equal(after, before) and after.data_ptr() == ptrs[name], name
        assert not after.requires_grad
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all("lora_" in n for n in trainable)


def test_save_pretrained_loads_onto_the_float_model(tmp_path):
    pq, pf = peft_pair(Int(4, 32))
    pq.save_pretrained(str(tmp_path))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert keys == sorted(f"base_model.model.{t}.lora_{ab}.weight" for t in TARGETS for ab in "AB")
    _, flt = models(Int(4, 32))
    loaded = PeftModel.from_pretrained(flt, str(tmp_path))
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded(x), pq(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded(x), pf(x), rtol=1e-5, atol=1e-5)


def test_merge_and_unload_requantizes():
    pq, pf = peft_pair(NF4(32))
    x = torch.randn(3, 64)
    y = pq(x)
    merged = pq.merge_and_unload()
    assert isinstance(merged.q_proj, QuantLinear) and merged.q_proj.qformat == NF4(32)
    err = (merged(x) - y).abs().max() / y.abs().max()
    assert err < 0.1, err  # one more rounding of the merged weight


def test_unsupported_variants_are_refused():
    quant, _ = models(Int(4, 32))
    with pytest.raises(ValueError):
        get_peft_model(quant, LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    pq, _ = peft_pair(Int(4, 32))
    pq.eval()  # peft itself refuses adapter_names in training mode
    with pytest.raises(FormatError, match="adapter_names"):
        pq(torch.randn(2, 64), adapter_names=["default", "default"])


# --- the transformers Trainer on a QuantLinear model ------------------------------------------
def tiny_llama():
    transformers = require("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   initializer_range=0.2)  # a frozen head with logits wide enough to learn through
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def test_trainer_with_gradient_checkpointing_lowers_the_loss(tmp_path):
    transformers = require("transformers")
    model = tiny_llama()
    pyquant.replace_linear(model, Int(4, 32))
    pyquant.add_lora(model, r=8, alpha=16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # learnable through the adapters: text drawn from 8 of the 64 tokens
    data = torch.randint(0, 8, (16, 16), generator=torch.Generator().manual_seed(0))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"input_ids": data[i], "labels": data[i]}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12, learning_rate=2e-2,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
