"""Test utilities: make removed channels exact duplicates of kept ones, and compare models."""

from __future__ import annotations

import copy
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_intrafusion import PruneReport, prune
from lightning_intrafusion.graph import build_graph, iter_groups, matches
from lightning_intrafusion.surgery import replay_history


class EvenUnitsFirst:
    """Importance that ranks even units (channels or heads) above odd ones, so at 50% sparsity
    unit 2m is kept and unit 2m+1 (its duplicate) is removed."""

    def __init__(self, unit: int = 1) -> None:
        self.unit = unit

    def __call__(self, group) -> torch.Tensor:
        n = len(group[0].idxs)
        units = torch.arange(n) // self.unit
        return (units % 2 == 0).double() + 1e-3 * torch.rand(n, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def duplicate_odd_units(model: nn.Module, example_inputs, include: Optional[Sequence[str]] = None,
                        units: Optional[Mapping[str, int]] = None, consumers: bool = False) -> None:
    """In every prunable group, copy the producer side (weights, biases, norm parameters and
    statistics) of unit 2m onto unit 2m+1. Consumer columns stay independent unless ``consumers``."""
    graph = build_graph(model, example_inputs)
    for group in iter_groups(graph):
        if group.protected or group.unsupported:
            continue
        if include is not None and not any(matches(p, include) for p in group.producers):
            continue
        unit = 1
        for pattern, size in (units or {}).items():
            if any(matches(p, [pattern]) for p in group.producers):
                unit = size
        for s in group.slices:
            if s.role != "producer" and not consumers:
                continue
            module, attr = group.targets[s.key]
            tensor = getattr(module, attr)
            for ch in range(group.width):
                if (ch // unit) % 2 == 1:
                    src = ch - unit
                    tensor.index_copy_(s.dim, s.positions[ch], tensor.index_select(s.dim, s.positions[src]))


@torch.no_grad()
def silence_odd_units(model: nn.Module, example_inputs) -> List[str]:
    """In every prunable group without a norm across its channels (LayerNorm, GroupNorm, RMSNorm, ConvNeXt-V2's
    global response norm: removing a channel changes the others' normalisation), zero every entry of unit 2m+1
    (channel, or head of the group's unit): producer rows, biases, BatchNorm parameters and statistics, and
    consumer columns, so those units compute nothing (a BatchNorm then outputs its zero bias) and removing
    exactly them leaves the outputs unchanged. Returns one producer name per silenced group."""
    graph = build_graph(model, example_inputs)
    modules = dict(model.named_modules())

    def across_channels(module: nn.Module) -> bool:
        kind = type(module).__name__.lower()
        return ("norm" in kind or "grn" in kind) and not isinstance(module, nn.modules.batchnorm._BatchNorm)

    silenced = []
    for group in iter_groups(graph):
        owners = [modules[m] for m in group.members if m in modules] + [owner for owner, _ in group.targets.values()]
        norms = [owner for owner in owners if across_channels(owner)]
        if group.protected or group.unsupported or norms or group.width < 2 * group.unit:
            continue
        odd = torch.tensor([ch for ch in range(group.width) if (ch // group.unit) % 2 == 1])
        for s in group.slices:
            module, attr = group.targets[s.key]
            rows = s.rows()
            rows[odd] = 0.0
            # through the slice, which knows where a channel sits (grouped conv inputs: a column per conv group)
            getattr(module, attr).copy_(s.write(rows, torch.arange(group.width)))
        silenced.append(group.producers[0])
    return silenced


def prune_with_mirrored_momentum(model: nn.Module, prune_step: Callable[[nn.Module], Any]) -> Any:
    """Give every parameter SGD momentum equal to its values, run ``prune_step(model)`` (plain pruning, so
    kept weights are unchanged), carry the state over with the report's removals, and assert that each
    momentum buffer still equals its (now smaller) parameter: state sliced exactly like the weights.
    Returns the report."""
    from lightning_intrafusion.optimizers import restore_optimizer_state, snapshot_optimizer_state

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        optimizer.state[p]["momentum_buffer"] = p.detach().clone()
    saved = snapshot_optimizer_state([optimizer], model)
    report = prune_step(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert restore_optimizer_state([optimizer], model, saved, report.removals) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        assert torch.equal(optimizer.state[p]["momentum_buffer"], p.detach()), name
    return report


def fuse_and_prune_plainly(model: nn.Module, inputs: Mapping[str, Any], sparsity: float,
                           **kwargs: Any) -> Tuple[nn.Module, nn.Module, PruneReport, torch.Tensor]:
    """Intra-Fusion and plain pruning of the same channels, each on a copy of a language ``model`` called
    with keyword ``inputs``. Returns the fused copy, the plainly pruned copy, the fusion's report and the
    unpruned model's logits."""
    with torch.no_grad():
        expected = model(**inputs).logits
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    report = prune(fused, inputs, sparsity, **kwargs)
    prune(plain, inputs, sparsity, **{**kwargs, "method": "default"})
    return fused, plain, report, expected


@torch.no_grad()
def assert_only_fusion_keeps_the_outputs(fused: nn.Module, plain: nn.Module, inputs: Mapping[str, Any],
                                         expected: torch.Tensor, atol: float = 1e-5) -> None:
    assert torch.allclose(fused(**inputs).logits, expected, atol=atol)
    assert (plain(**inputs).logits - expected).abs().max() > 1e-2


@torch.no_grad()
def assert_reloads(pruned: nn.Module, fresh: nn.Module, report: PruneReport, inputs: Mapping[str, Any]) -> None:
    """How a pruned checkpoint is reloaded: a model built from the same config (``fresh``), the recorded
    removals replayed on it, the weights loaded; it computes exactly what ``pruned`` computes."""
    replay_history(fresh, [report.removals])
    fresh.load_state_dict(pruned.state_dict())
    assert torch.equal(fresh(**inputs).logits, pruned(**inputs).logits)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
            if isinstance(m, norms):
                n = m.num_features
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=g))
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                    m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def state(model: nn.Module) -> dict:
    """Everything that pruning may change: tensors (cloned) and layer shape attributes."""
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out["__repr__"] = repr(model)
    return out


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "__repr__":
            assert a[k] == b[k]
        else:
            assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
            assert torch.equal(a[k], b[k]), k


class ChannelShuffleNet(nn.Module):
    """ShuffleNet's channel shuffle: a reshape and a transpose permute the channels between two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        b, c, height, width = h.shape
        h = h.view(b, 2, c // 2, height, width).transpose(1, 2).reshape(b, c, height, width)
        return self.fc(torch.relu(self.c2(h)).mean((2, 3)))


class HeadCountAttention(nn.Module):
    """Hand-written attention that reshapes its projections with a head count kept as an attribute
    (``count_attribute``): ``view(batch, -1, heads, head_size)`` before ``scaled_dot_product_attention``, or
    ``view(batch, tokens, heads, -1)`` before explicit matrix products (``explicit``)."""

    def __init__(self, dim: int = 16, heads: int = 4, count_attribute: str = "num_heads", explicit: bool = False) -> None:
        super().__init__()
        self.count_attribute, self.head_size, self.explicit = count_attribute, dim // heads, explicit
        setattr(self, count_attribute, heads)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        batch, tokens, _ = x.shape
        heads = getattr(self, self.count_attribute)
        if self.explicit:
            q, k, v = (p(x).view(batch, tokens, heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            out = ((q @ k.transpose(-2, -1)) * self.head_size ** -0.5).softmax(-1) @ v
        else:
            q, k, v = (p(x).view(batch, -1, heads, self.head_size).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class HeadCountNet(nn.Module):
    """Digits as 8 tokens of 8 pixels, embedded, one :class:`HeadCountAttention` (4 heads; ``attention``: its
    other arguments), mean-pooled."""

    def __init__(self, **attention: Any) -> None:
        super().__init__()
        self.embed, self.attn, self.fc = nn.Linear(8, 16), HeadCountAttention(**attention), nn.Linear(16, 10)

    def forward(self, x):
        tokens = self.embed(x.reshape(x.shape[0], 8, 8))
        return self.fc((tokens + self.attn(tokens)).mean(1))


@torch.no_grad()
def halve_odd_rows(layer: nn.Module) -> None:
    """Odd output units become half the even ones before them (weights and bias): after a ReLU, positively
    homogeneous, they output exactly half of what their even neighbours do; L1 ranks them last."""
    layer.weight[1::2] = 0.5 * layer.weight[0::2]
    layer.bias[1::2] = 0.5 * layer.bias[0::2]


def refused_untouched_then_skipped(model: nn.Module, inputs: Any, error: type, message: str, warning: str,
                                   **kwargs: Any) -> PruneReport:
    """``prune(model, inputs, 0.5, **kwargs)`` raises ``error`` matching ``message`` and leaves the model as it
    was; with ``on_unsupported="skip"`` it warns (matching ``warning``), prunes the rest and returns the report."""
    before = state(model)
    with pytest.raises(error, match=message):
        prune(model, inputs, 0.5, **kwargs)
    assert_same_state(before, state(model))
    with pytest.warns(UserWarning, match=warning):
        return prune(model, inputs, 0.5, on_unsupported="skip", **kwargs)


@torch.no_grad()
def twin_odd_heads(model: nn.Module, inputs: Mapping[str, Any], output_projections: Sequence[nn.Linear], unit: int = 8,
                   queries: str = "*.q_proj") -> None:
    """Unit 2m+1 of every group of the ``queries`` projections (a head, or a key/value head's query heads: ``unit``
    channels) made a twin of unit 2m (query, key and value rows), and its columns in each output projection
    halved, so that magnitude importance keeps the even units."""
    duplicate_odd_units(model, inputs, include=[queries], units={queries: unit})
    for projection in output_projections:
        for start in range(unit, projection.in_features, 2 * unit):
            projection.weight[:, start:start + unit] *= 0.5


@torch.no_grad()
def rank_odd_units_last(producer: nn.Linear, consumer: nn.Linear, unit: int = 1) -> None:
    """Every row of ``producer`` and column of ``consumer`` of unit norm, then the consumer columns of odd units
    (``unit`` channels each) halved, so that magnitude keeps the even units (and a duplicate's merged columns
    differ from the kept unit's own)."""
    producer.weight.div_(producer.weight.norm(dim=1, keepdim=True))
    consumer.weight.div_(consumer.weight.norm(dim=0, keepdim=True))
    for start in range(unit, consumer.in_features, 2 * unit):
        consumer.weight[:, start:start + unit] *= 0.5


@torch.no_grad()
def odd_rows_at_cosine(layer: nn.Module, cosine: float) -> None:
    """Orthogonal rows of norm 10 (dominating the channels' features), then every odd row made the even row before
    it plus an orthogonal part, at the given cosine similarity to it (norm 10 again)."""
    out_features, in_features = layer.weight.shape
    rows = torch.linalg.qr(torch.randn(in_features, out_features)).Q.T * 10.0
    layer.weight.copy_(rows)
    layer.weight[1::2] = rows[0::2] + (1.0 / cosine ** 2 - 1.0) ** 0.5 * rows[1::2]
    layer.weight[1::2] *= 10.0 / layer.weight[1::2].norm(dim=1, keepdim=True)


@torch.no_grad()
def halve_odd_heads(model: nn.Module, head_dim: int = 8) -> None:
    """In every ``nn.MultiheadAttention`` of a 4-head SmallTransformer, heads 1 and 3 attend like heads 0 and 2
    (same query/key rows) with half their values, so they output exactly half of what heads 0 and 2 do; their
    output-projection columns are halved too, so L1 ranks them last (and the projection keeps full rank)."""
    for block in model.blocks:
        attn = block.attn
        for kept, removed in ((0, 1), (2, 3)):
            k, r = slice(kept * head_dim, (kept + 1) * head_dim), slice(removed * head_dim, (removed + 1) * head_dim)
            for weights in (attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)):
                for section, factor in zip(weights, (1.0, 1.0, 0.5)):
                    section[r] = factor * section[k]
            attn.out_proj.weight[:, r] *= 0.5

