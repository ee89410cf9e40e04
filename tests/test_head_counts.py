"""Attention written by hand with ``scaled_dot_product_attention`` whose forward reshapes the projections
with a head count held in an attribute (``view(batch, -1, self.num_heads, head_size)``, as Hugging Face
OPT does). After heads are removed, a stale count would not fail: the ``-1`` would absorb the difference
and regroup tokens silently. The count is kept in step (and replayed); a count the library does not know
by name is caught by comparing every attention call's shape before and after, and the step is refused."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import assert_same_state, state
from lightning_intrafusion import prune
from lightning_intrafusion.pruner import ForwardBrokenError
from lightning_intrafusion.surgery import replay_history


class HeadCountAttention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4, count_attribute: str = "num_heads") -> None:
        super().__init__()
        self.count_attribute, self.head_size = count_attribute, dim // heads
        setattr(self, count_attribute, heads)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        batch, tokens, _ = x.shape
        heads = getattr(self, self.count_attribute)

        def split(t):
            return t.view(batch, -1, heads, self.head_size).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class Net(nn.Module):
    def __init__(self, count_attribute: str = "num_heads") -> None:
        super().__init__()
        self.attn = HeadCountAttention(count_attribute=count_attribute)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(x + self.attn(x))


def _silence_odd_heads(model: Net) -> None:
    """Heads 1 and 3 compute nothing (zero query/key/value rows and biases, zero output columns), so plain
    pruning (l2) removes exactly them and must leave the outputs unchanged."""
    with torch.no_grad():
        for start in (4, 12):
            for layer in (model.attn.q_proj, model.attn.k_proj, model.attn.v_proj):
                layer.weight[start:start + 4] = 0
                layer.bias[start:start + 4] = 0
            model.attn.out_proj.weight[:, start:start + 4] = 0


def test_head_count_attribute_follows_the_removed_heads_and_replays():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 6, 16)
    _silence_odd_heads(model)
    expected = model(x)
    report = prune(model, x, 0.5, method="default", importance="l2", include=["attn.q_proj"])
    assert [(g.width_before, g.width_after) for g in report.groups] == [(16, 8)]
    assert model.attn.num_heads == 2 and model.attn.q_proj.out_features == 8
    assert ["attn", "count:num_heads", [1, 3]] in report.removals
    assert torch.allclose(model(x), expected, atol=1e-6)  # tokens not regrouped: the silent heads went, nothing else
    fresh = Net()
    replay_history(fresh, [report.removals])
    fresh.load_state_dict(model.state_dict())
    assert fresh.attn.num_heads == 2 and torch.equal(fresh(x), model(x))


def test_a_head_count_under_an_unknown_name_is_caught_and_the_step_refused():
    torch.manual_seed(0)
    model, x = Net(count_attribute="h"), torch.randn(2, 6, 16)
    before = state(model)
    with pytest.raises(ForwardBrokenError, match="attends differently"):
        prune(model, x, 0.5, include=["attn.q_proj"])
    assert_same_state(before, state(model))
    with pytest.warns(UserWarning, match="attention regrouped"):
        report = prune(model, x, 0.5, include=["attn.q_proj"], on_unsupported="skip")
    assert list(report.unsupported) == ["attn.v_proj"]  # the heads' group, rooted at one of its projections
    assert model.attn.q_proj.out_features == 16 and model(x).shape == (2, 6, 3)
