import pytest
import torch
from torch import nn

import pyquant
from pyquant.algorithms import awq as A
from pyquant.algorithms import awq_fold as F
from pyquant.algorithms.rtn import rtn
from pyquant.formats import Int


def outlier_inputs(k, n=1024, seed=0, n_salient=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, :n_salient] *= 20  # a few salient channels, as in LLM activations
    return x


def test_scale_search_helps_with_salient_channels():
    torch.manual_seed(0)
    k = 128
    x = outlier_inputs(k)
    gram = x.T @ x
    ws = [torch.randn(64, k) * 0.05, torch.randn(32, k) * 0.05]
    fmt = Int(3, 64)
    res = A.awq_search_scale(ws, gram, x.abs().mean(0), fmt, grid=20, duo_scaling="both")
    assert res.loss <= res.loss_rtn
    assert res.loss < 0.8 * res.loss_rtn, (res.loss, res.loss_rtn)
    assert 0 < res.ratio < 1
    assert res.scale[:4].mean() > res.scale[4:].mean()  # salient channels get larger scales
    # the loss is the output error of Q(W s)/s
    total = sum(A.output_error(A.rtn_dequant(w * res.scale, fmt) / res.scale - w, gram) for w in ws)
    assert abs(total - res.loss) <= 1e-4 * res.loss


@pytest.mark.parametrize("duo", [False, True, "both"])
def test_scale_search_never_worse_than_rtn(duo):
    torch.manual_seed(1)
    k = 64
    x = torch.randn(256, k)
    res = A.awq_search_scale([torch.randn(16, k)], x.T @ x, x.abs().mean(0), Int(4, 32), grid=5, duo_scaling=duo)
    assert res.loss <= res.loss_rtn
    if res.ratio == 0:
        assert torch.equal(res.scale, torch.ones(k))


def test_clip_search_lowers_output_error():
    torch.manual_seed(2)
    k = 128
    x = torch.randn(512, k)
    gram = x.T @ x
    w = torch.randn(32, k)
    w[:, 5] *= 10
    fmt = Int(3, 32)
    shrink = A.awq_clip_search(w, gram, fmt, grid=20, max_shrink=0.5)
    assert shrink.shape == (32, 4)
    assert float(shrink.min()) >= 0.5 and float(shrink.max()) <= 1.0
    clipped = A.rtn_quantize(w, fmt, shrink).dequantize(torch.float32)
    plain = A.rtn_quantize(w, fmt).dequantize(torch.float32)
    assert A.output_error(clipped - w, gram) < A.output_error(plain - w, gram)


def test_rtn_quantize_without_shrink_is_rtn():
    torch.manual_seed(3)
    w = torch.randn(10, 100)
    for fmt in (Int(4, 32), Int(3, 64, True), Int(4, -1)):
        a, b = A.rtn_quantize(w, fmt), rtn(w, fmt)
        for name in b.tensors:
            assert torch.equal(a.tensors[name], b.tensors[name])


def test_gqa_tie_and_untie():
    tie = F.gqa_tie(num_heads=4, num_kv_heads=2, head_dim=3)
    # query heads 0,1 read kv head 0; heads 2,3 read kv head 1
    assert tie.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert F.gqa_tie(4, 4, 3) is None
    v = torch.arange(12.0)
    tied = A._tie(v, tie)
    assert torch.equal(tied[:3], tied[3:6])
    assert torch.equal(F.untie(tied, tie, 6), torch.tensor([1.5, 2.5, 3.5, 7.5, 8.5, 9.5]))


def test_folding_keeps_the_float_function():
    torch.manual_seed(4)
    norm_w = torch.rand(16) + 0.5
    lin = nn.Linear(16, 8)
    prev = nn.Linear(4, 16)
    x = torch.randn(5, 4)
    s = torch.rand(16) + 0.5
    y0 = lin(prev(x) * norm_w)
    F.scale_columns(lin, s)
    F.fold_into_rows(prev, s)
    torch.testing.assert_close(lin(prev(x) * norm_w), y0)


def test_scaled_input_linear():
    torch.manual_seed(5)
    lin = nn.Linear(16, 4)
    x = torch.randn(3, 16)
    y0 = lin(x)
    s = torch.rand(16) + 0.5
    F.scale_columns(lin, s)
    wrapped = F.ScaledInputLinear(lin, s)
    torch.testing.assert_close(wrapped(x), y0)
    assert wrapped.in_features == 16 and wrapped.out_features == 4


class ToyBlock(nn.Module):
    """Not Llama: the second linear reads a GELU output (no producer can absorb a scale)."""

    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x, **kw):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class ToyLM(nn.Module):
    def __init__(self, vocab=50, d=32, n=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([ToyBlock(d) for _ in range(n)])
        self.head = nn.Linear(d, vocab)

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, **kw):
        h = self.emb(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_awq_on_a_non_llama_block_uses_an_explicit_input_scale():
    torch.manual_seed(6)
    model = ToyLM()
    with torch.no_grad():
        model.emb.weight[:, :3] *= 30  # salient channels so that scaling pays off
    ids = torch.randint(0, 50, (8, 16))
    with torch.no_grad():
        ref = model(ids)
    report = pyquant.quantize_model(model, pyquant.QuantConfig("awq", bits=8, group_size=32), ids,
                                    progress=False, verbose=False)
    wrapped = [m for m in model.modules() if isinstance(m, F.ScaledInputLinear)]
    assert any("explicit input scale" in r.note for r in report)
    assert len(wrapped) == sum("explicit input scale" in r.note for r in report)
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, pyquant.QuantLinear)
    with torch.no_grad():
        out = model(ids)
    assert float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 1e-3
