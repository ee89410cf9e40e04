"""Data-free correction of the BatchNorms after layers whose inputs were pruned or fused."""

import copy

import torch
from torch import nn

from helpers import randomize_batchnorm
from lightning_intrafusion import OTConfig, prune
from lightning_intrafusion.datasets import digits_tensors
from lightning_intrafusion.fusion import (ChannelSlice, channel_features, channel_gram, channel_square_norms, gram,
                                          output_variance_ratios)
from lightning_intrafusion.graph import build_graph, iter_groups
from lightning_intrafusion.models import SmallResNet, SmallVGG


def test_ratio_is_the_kept_weight_energy_for_uncorrelated_channels():
    producer = torch.eye(4, dtype=torch.float64)  # orthogonal channels: correlation = identity
    consumer = torch.tensor([[1.0, 2.0, 0.0, 2.0], [0.0, 0.0, 3.0, 4.0]])
    slice_ = ChannelSlice("next.weight", consumer, 1, torch.arange(4)[:, None], "consumer")
    kept = torch.tensor([0, 2])
    identity = torch.zeros(2, 4, dtype=torch.float64)
    identity[0, 0] = identity[1, 2] = 1.0  # plain pruning: the kept channels stay as they are
    ratios = output_variance_ratios([slice_], gram(producer), identity, kept, {"next.weight": consumer})
    assert torch.allclose(ratios["next.weight"], torch.tensor([1.0 / 9.0, 9.0 / 25.0]))


def _batchnorm_inputs(model, images):
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, inp[0]))
             for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model.eval()(images)
    for h in hooks:
        h.remove()
    return seen


def _trained_vgg(train) -> nn.Module:
    torch.manual_seed(0)
    model = SmallVGG(width=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def test_corrected_statistics_match_the_data_better():
    """On real digits: after fusing 30% of the channels of a trained VGG, the BN running variances
    set without data are closer to the variances the data really has with the correction (without
    it they fall behind layer after layer)."""
    train, test = digits_tensors()
    images = test.tensors[0]
    model = _trained_vgg(train)
    errors = {}
    for correct in (False, True):
        pruned = copy.deepcopy(model)
        prune(pruned, images[:8], 0.3, ot_config=OTConfig(correct_variance=correct))
        norms = dict(pruned.named_modules())
        logs = []
        for name, x in _batchnorm_inputs(pruned, images).items():
            true_var = x.transpose(0, 1).flatten(1).var(1)
            logs.append((true_var / norms[name].running_var).log().abs().mean())
        errors[correct] = torch.stack(logs[1:]).mean()  # the first BN's input is never pruned
    assert errors[True] < 0.75 * errors[False]


def test_gram_matrices_are_those_of_the_concatenated_features():
    """channel_gram sums each weight tensor's share instead of concatenating the features: the same
    matrix (or columns of it), for BN-folded producers, consumers, and a group whose producers have no
    weights; channel_square_norms is its diagonal."""
    torch.manual_seed(0)
    model = SmallResNet(width=8, blocks=(1, 1))
    randomize_batchnorm(model)
    groups = [g for g in iter_groups(build_graph(model, torch.randn(2, 1, 8, 8))) if not g.protected]
    assert any(g.folds for g in groups)
    for group in groups:
        for roles in (("producer",), ("producer", "consumer")):
            f = channel_features(group.slices, group.folds, roles).float()
            full = channel_gram(group.slices, group.folds, roles)
            assert torch.allclose(full, f @ f.T, rtol=1e-4, atol=1e-5), (group.root_name, roles)
            columns = torch.tensor([0, 2, 3])
            assert torch.allclose(channel_gram(group.slices, group.folds, roles, columns), full[:, columns], rtol=1e-4, atol=1e-5)
            assert torch.allclose(channel_square_norms(group.slices, group.folds, roles), full.diagonal(), rtol=1e-4, atol=1e-5)
    only_consumers = [ChannelSlice("next.weight", torch.randn(3, 4), 1, torch.arange(4)[:, None], "consumer")]
    f = channel_features(only_consumers, (), ("producer",))
    assert torch.equal(channel_gram(only_consumers, (), ("producer",)), f @ f.T)
