"""Layers whose weight is computed from other parameters (weight or spectral normalisation; Wav2Vec2's
positional convolution): a pruning step cannot resize such a weight (the layer's pruning function cannot
assign it, or the older hook-based weight_norm would recompute it from the unpruned parts), so the
groups touching it are refused with a clear error, or left whole with on_unsupported="skip"."""

import warnings

import pytest
import torch
from torch import nn

from helpers import assert_same_state, state
from lightning_intrafusion import UnsupportedModelError, prune


def _net(style: str) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    if style == "parametrize":
        net[2] = nn.utils.parametrizations.weight_norm(net[2])
    elif style == "spectral":
        net[2] = nn.utils.spectral_norm(net[2])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated, still in use
            net[2] = nn.utils.weight_norm(net[2])
    return net


@pytest.mark.parametrize("style", ["parametrize", "hook", "spectral"])
def test_groups_touching_a_normalised_weight_are_refused_or_left_whole(style):
    net, x = _net(style), torch.randn(4, 8)
    before = state(net)
    with pytest.raises(UnsupportedModelError, match="computed from other parameters"):
        prune(net, x, 0.5)
    assert_same_state(before, state(net))
    with pytest.warns(UserWarning, match="computed from other parameters"):
        report = prune(net, x, 0.5, on_unsupported="skip")
    assert sorted(report.unsupported) == ["0", "2"]  # both groups touch layer 2's weight, as consumer and producer
    assert net(x).shape == (4, 3)
