"""Attention written by hand whose forward reshapes the projections with a head count held in an
attribute: ``view(batch, -1, self.num_heads, head_size)`` before ``scaled_dot_product_attention`` (as
Hugging Face OPT does), or ``view(batch, tokens, self.heads, -1)`` before explicit matrix products. After
heads are removed, a stale count would not fail: the ``-1`` would absorb the difference and regroup
tokens (or head dimensions) silently. The count is kept in step (and replayed); a count the library does
not know by name is caught by comparing every attention computation's shape before and after, and the
step is refused."""

import pytest
import torch
from torch import nn

from helpers import HeadCountAttention, assert_same_state, state
from lightning_intrafusion import prune
from lightning_intrafusion import ForwardBrokenError
from lightning_intrafusion.surgery import replay_history


class Net(nn.Module):
    def __init__(self, count_attribute: str = "num_heads", explicit: bool = False) -> None:
        super().__init__()
        self.attn = HeadCountAttention(count_attribute=count_attribute, explicit=explicit)
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


# explicit matrix products hide the head size from the graph: it is given by channel_blocks
STYLES = {"sdpa": ("num_heads", False, {}), "explicit": ("heads", True, {"attn.*_proj": 4})}


@pytest.mark.parametrize("style", list(STYLES))
def test_head_count_attribute_follows_the_removed_heads_and_replays(style):
    attribute, explicit, blocks = STYLES[style]
    torch.manual_seed(0)
    model, x = Net(attribute, explicit), torch.randn(2, 6, 16)
    _silence_odd_heads(model)
    expected = model(x)
    report = prune(model, x, 0.5, method="default", importance="l2", include=["attn.q_proj"], channel_blocks=blocks)
    assert [(g.width_before, g.width_after) for g in report.groups] == [(16, 8)]
    assert getattr(model.attn, attribute) == 2 and model.attn.q_proj.out_features == 8
    assert ["attn", f"count:{attribute}", [1, 3]] in report.removals
    assert torch.allclose(model(x), expected, atol=1e-6)  # nothing regrouped: the silent heads went, nothing else
    fresh = Net(attribute, explicit)
    replay_history(fresh, [report.removals])
    fresh.load_state_dict(model.state_dict())
    assert getattr(fresh.attn, attribute) == 2 and torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("style", list(STYLES))
def test_a_head_count_under_an_unknown_name_is_caught_and_the_step_refused(style):
    _, explicit, blocks = STYLES[style]
    torch.manual_seed(0)
    model, x = Net("h", explicit), torch.randn(2, 6, 16)
    before = state(model)
    with pytest.raises(ForwardBrokenError, match="attends differently"):
        prune(model, x, 0.5, include=["attn.q_proj"], channel_blocks=blocks)
    assert_same_state(before, state(model))
    with pytest.warns(UserWarning, match="attention regrouped"):
        report = prune(model, x, 0.5, include=["attn.q_proj"], channel_blocks=blocks, on_unsupported="skip")
    assert len(report.unsupported) == 1 and not report.groups  # the heads' group, left whole
    assert model.attn.q_proj.out_features == 16 and model(x).shape == (2, 6, 3)


def test_a_failed_step_puts_the_head_count_back(monkeypatch):
    """All or nothing: a step that fails after the removals restores the count with the weights."""
    import lightning_intrafusion.pruner as pruner

    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 6, 16)
    before = state(model)

    def fail(*args, **kwargs):
        assert model.attn.num_heads == 2  # the removal did happen
        raise RuntimeError("injected failure after the removals")

    monkeypatch.setattr(pruner, "check_still_runs", fail)
    with pytest.raises(RuntimeError, match="injected"):
        prune(model, x, 0.5, include=["attn.q_proj"])
    assert model.attn.num_heads == 4
    assert_same_state(before, state(model))
