"""Heads of nn.MultiheadAttention: the prunable drop-in layer, exact fusion of duplicated heads,
persistence, optimizer state and refusals."""

import copy
import itertools

import pytest
import torch
from torch import nn

from helpers import EvenUnitsFirst, assert_same_state, duplicate_odd_units, state
from lightning_intrafusion import OTConfig, UnsupportedModelError, prune
from lightning_intrafusion.attention import PrunableMultiheadAttention
from lightning_intrafusion.models import SmallTransformer
from lightning_intrafusion.optimizers import restore_optimizer_state, snapshot_optimizer_state
from lightning_intrafusion.surgery import replay_history

X = torch.randn(6, 1, 8, 8)


class Encoder(nn.Module):
    """nn.TransformerEncoder over image rows, as users build it (sequence-first, post-norm)."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=64, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        tokens = self.embed(x.reshape(x.shape[0], 8, 8)).transpose(0, 1)
        return self.head(self.encoder(tokens).mean(0))


MODELS = {
    "small_transformer": (lambda: SmallTransformer(dim=32, heads=4, mlp=64, attention="torch"), "*.attn"),
    "transformer_encoder": (Encoder, "*.self_attn"),
}


@torch.no_grad()
def _duplicate_odd_heads(model: nn.Module) -> None:
    """Head 2m+1 computes exactly what head 2m computes; its output-projection columns are scaled
    down so that magnitude importance keeps the even heads."""
    for mha in (m for m in model.modules() if isinstance(m, nn.MultiheadAttention)):
        d = mha.head_dim
        projections = [mha.in_proj_weight[i * mha.embed_dim:(i + 1) * mha.embed_dim] for i in range(3)] \
            if mha._qkv_same_embed_dim else [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
        biases = mha.in_proj_bias.view(3, -1)
        for head in range(1, mha.num_heads, 2):
            src, dst = slice((head - 1) * d, head * d), slice(head * d, (head + 1) * d)
            for weight, bias in zip(projections, biases):
                weight[dst] = weight[src]
                bias[dst] = bias[src]
            mha.out_proj.weight[:, dst] *= 0.5


@pytest.mark.parametrize("batch_first, bias, add_bias_kv, add_zero_attn, need_weights",
                         list(itertools.product([True, False], [True, False], [False, True], [False, True], [True, False])))
def test_converted_layer_computes_what_torch_computes(batch_first, bias, add_bias_kv, add_zero_attn, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
                                batch_first=batch_first).eval()
    converted = PrunableMultiheadAttention.from_torch(mha)
    assert converted.state_dict().keys() == mha.state_dict().keys() and converted.num_heads == 4
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    padding = torch.rand(3, 5) > 0.7
    padding[:, 0] = False
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for masks in ({}, {"key_padding_mask": padding}, {"attn_mask": causal, "key_padding_mask": padding},
                  {"attn_mask": torch.randn(12, 5, 5)}):
        expected = mha(x, x, x, need_weights=need_weights, **masks)
        got = converted(x, x, x, need_weights=need_weights, **masks)
        assert torch.allclose(got[0], expected[0], atol=1e-6)
        assert (got[1] is None) == (expected[1] is None)
        if expected[1] is not None:
            assert torch.allclose(got[1], expected[1], atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_fusing_duplicated_heads_preserves_outputs(name):
    factory, glob = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    _duplicate_odd_heads(model)
    with torch.no_grad():
        expected = model(X)
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)

    report = prune(fused, X, 0.5, include=[glob])
    prune(plain, X, 0.5, method="default", include=[glob])

    layers = [m for m in fused.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(layers) == 2 and all(isinstance(m, PrunableMultiheadAttention) and m.num_heads == 2 for m in layers)
    assert all(g.width_after == 16 for g in report.groups)
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    assert report.params_after == sum(p.numel() for p in fused.parameters())
    with torch.no_grad():
        assert torch.allclose(fused(X), expected, atol=1e-5)
        assert (plain(X) - expected).abs().max() > 1e-2
    fused.train()
    fused(X).sum().backward()  # still trainable
    assert all(p.grad is not None and p.grad.shape == p.shape for p in fused.parameters())


def test_pruned_heads_replay_into_a_fresh_model():
    torch.manual_seed(0)
    model = SmallTransformer(dim=32, heads=4, mlp=64, attention="torch").eval()
    first = prune(model, X, 0.25)  # embedding width, heads and MLP neurons
    second = prune(model, X, 0.5, include=["*.attn"], reference_widths={g.name: g.width_before for g in first.groups})
    assert [m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)] == [2, 2]
    fresh = SmallTransformer(dim=32, heads=4, mlp=64, attention="torch").eval()
    replay_history(fresh, [first.removals, second.removals])
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(X), model(X))


def test_optimizer_state_follows_the_kept_heads():
    torch.manual_seed(0)
    model = SmallTransformer(dim=32, heads=4, mlp=64, attention="torch")
    optimizer = torch.optim.Adam(model.parameters())
    model(X).sum().backward()
    optimizer.step()
    saved = snapshot_optimizer_state([optimizer], model)
    report = prune(model, X, 0.5, include=["blocks.0.attn"])
    removed = next(idx for name, side, idx in report.removals if name == "blocks.0.attn" and side == "heads")
    kept = torch.tensor([i for i in range(32) if i not in set(removed)])
    optimizer = torch.optim.Adam(model.parameters())
    assert restore_optimizer_state([optimizer], model, saved, report.removals) == len(list(model.parameters()))

    attn = model.blocks[0].attn
    old_in = saved["blocks.0.attn.in_proj_weight"]["state"]["exp_avg"]
    assert torch.equal(optimizer.state[attn.in_proj_weight]["exp_avg"], old_in[torch.cat([kept, kept + 32, kept + 64])])
    old_out = saved["blocks.0.attn.out_proj.weight"]["state"]["exp_avg_sq"]
    assert torch.equal(optimizer.state[attn.out_proj.weight]["exp_avg_sq"], old_out[:, kept])


REST = {"small_transformer": ["embed", "*.fc1", "*.fc2"], "transformer_encoder": ["embed", "*.linear1", "*.linear2"]}


@pytest.mark.parametrize("name", list(MODELS))
def test_fusing_duplicated_channels_everywhere_preserves_outputs(name):
    """Heads, then the embedding (residual) width and the MLP neurons: every removed head or channel
    duplicates a kept one (heads: whose output projection outweighs its duplicate's)."""
    factory, glob = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    duplicate_odd_units(model, X, units={glob: 8})
    _duplicate_odd_heads(model)
    with torch.no_grad():
        expected = model(X)
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)

    config = OTConfig(features="producer")
    heads = prune(fused, X, 0.5, ot_config=config, include=[glob])
    rest = prune(fused, X, 0.5, ot_config=config, include=REST[name], importance=EvenUnitsFirst())
    prune(plain, X, 0.5, method="default", include=[glob])
    prune(plain, X, 0.5, method="default", include=REST[name], importance=EvenUnitsFirst())

    assert all(g.width_after * 2 == g.width_before for g in heads.groups + rest.groups)
    assert any(g.name.endswith(("fc2", "linear2")) for g in rest.groups)  # the residual stream
    assert all(m.embed_dim == 16 and m.num_heads == 2 for m in fused.modules() if isinstance(m, nn.MultiheadAttention))
    with torch.no_grad():
        assert torch.allclose(fused(X), expected, atol=1e-5)
        assert (plain(X) - expected).abs().max() > 1e-2
    fused.train()
    fused(X).sum().backward()


class CrossAttention(nn.Module):
    """Queries from a projection of the rows, keys and values straight from the 8-pixel rows."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)
        self.query = nn.Linear(8, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        rows = x.reshape(-1, 8, 8)
        return self.head(self.mha(self.query(rows), rows, rows, need_weights=False)[0].mean(1))


def test_heads_of_attention_with_other_key_width():
    """Separate q/k/v projections (kdim/vdim != embed_dim): heads are pruned and fused exactly; the
    embedding width such a layer reads is refused."""
    torch.manual_seed(0)
    model = CrossAttention().eval()
    converted = PrunableMultiheadAttention.from_torch(model.mha)
    q = torch.randn(3, 5, 16)
    kv = torch.randn(3, 7, 8)
    assert torch.allclose(converted(q, kv, kv)[0], model.mha(q, kv, kv)[0], atol=1e-6)
    before = state(model)
    with pytest.raises(UnsupportedModelError, match="kdim/vdim"):
        prune(model, X, 0.5)
    assert_same_state(before, state(model))

    _duplicate_odd_heads(model)
    with torch.no_grad():
        expected = model(X)
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    prune(fused, X, 0.5, include=["mha"])
    prune(plain, X, 0.5, include=["mha"], method="default")
    assert fused.mha.num_heads == 1 and fused.mha.q_proj_weight.shape == (8, 16) and fused.mha.k_proj_weight.shape == (8, 8)
    with torch.no_grad():
        assert torch.allclose(fused(X), expected, atol=1e-5)
        assert (plain(X) - expected).abs().max() > 1e-2


def test_custom_importance_on_heads_gets_a_clear_error():
    model = SmallTransformer(dim=32, heads=4, mlp=64, attention="torch")
    before = state(model)
    with pytest.raises(TypeError, match="attention"):
        prune(model, X, 0.5, include=["*.attn"], importance=lambda group: torch.ones(32))
    assert_same_state(before, state(model))


def test_failure_after_heads_were_removed_restores_the_torch_layer(monkeypatch):
    import lightning_intrafusion.pruner as pruner

    def failing_calibration(model, *args):
        assert all(type(b.attn) is PrunableMultiheadAttention for b in model.blocks)  # heads were removed
        raise RuntimeError("injected failure")

    monkeypatch.setattr(pruner, "recalibrate_batchnorm", failing_calibration)
    model = SmallTransformer(dim=32, heads=4, mlp=64, attention="torch")
    before = state(model)
    with pytest.raises(RuntimeError, match="injected failure"):
        prune(model, X, 0.5, include=["*.attn"], calibration_data=[X])
    assert all(type(b.attn) is nn.MultiheadAttention for b in model.blocks)
    assert_same_state(before, state(model))
