"""Data-free calibration inputs distilled from BatchNorm statistics, and BN re-estimation on them."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import assert_same_state, state
from lightning_intrafusion import OTConfig, batchnorm_drift, prune, recalibrate_batchnorm, synthesize_inputs
from lightning_intrafusion.datasets import digits_tensors
from lightning_intrafusion.models import MLP, SmallVGG


@pytest.fixture(scope="module")
def digits():
    return digits_tensors()


@pytest.fixture(scope="module")
def trained_vgg(digits):
    """A small VGG trained on digits for a few epochs (half a second)."""
    train, _ = digits
    torch.manual_seed(0)
    model = SmallVGG(width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = train.tensors
    for _ in range(8):
        order = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            batch = order[i:i + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def _accuracy(model, data):
    with torch.no_grad():
        return (model(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean().item()


def test_synthetic_inputs_reproduce_every_batchnorm_s_statistics(trained_vgg, digits):
    example = digits[0].tensors[0][:8]
    random = batchnorm_drift(trained_vgg, synthesize_inputs(trained_vgg, example, steps=0))
    distilled = batchnorm_drift(trained_vgg, synthesize_inputs(trained_vgg, example))
    assert list(distilled) == ["features.0.1", "features.1.1", "features.3.1", "features.4.1"]
    for name, d in distilled.items():
        assert d.mean_shift.abs().max() < 0.15, name
        assert 0.75 < d.variance_ratio.min() and d.variance_ratio.max() < 1.35, name
    assert max(d.mean_shift.abs().max() for d in random.values()) > 1.0  # where the optimisation started


def test_synthetic_calibration_recovers_about_what_real_data_does(trained_vgg, digits):
    train, test = digits
    example = train.tensors[0][:8]
    for method in ("default", "intrafusion"):
        without, synthetic, real = (copy.deepcopy(trained_vgg) for _ in range(3))
        prune(without, example, 0.3, method=method)
        report = prune(synthetic, example, 0.3, method=method, calibration_data="synthetic")
        prune(real, example, 0.3, method=method, calibration_data=[train.tensors[0][:256]])
        assert report.calibrated and report.calibration == "synthetic"
        # fusion alone keeps much of the accuracy without data (0.84 here), plain pruning far less (0.56)
        assert _accuracy(synthetic, test) > _accuracy(without, test) + (0.02 if method == "intrafusion" else 0.2), method
        assert _accuracy(synthetic, test) > _accuracy(real, test) - 0.03, method


def test_prune_with_synthetic_calibration_is_recalibration_on_inputs_distilled_before_pruning(trained_vgg, digits):
    example = digits[0].tensors[0][:8]
    built_in, by_hand = copy.deepcopy(trained_vgg), copy.deepcopy(trained_vgg)
    prune(built_in, example, 0.5, calibration_data="synthetic", compensation="none")
    inputs = synthesize_inputs(by_hand, example)
    # with statistics re-estimated afterwards, the default solver="auto" takes Sinkhorn plans
    prune(by_hand, example, 0.5, ot_config=OTConfig(solver="sinkhorn"), compensation="none")
    recalibrate_batchnorm(by_hand, inputs)
    assert_same_state(state(built_in), state(by_hand))


def test_synthesis_leaves_the_model_as_it_was_and_is_deterministic(trained_vgg, digits):
    model = copy.deepcopy(trained_vgg).train()
    model.features[0][0].weight.requires_grad_(False)
    before = state(model)
    first = synthesize_inputs(model, digits[0].tensors[0][:8], num_samples=32, steps=20, batch_size=8)
    assert_same_state(before, state(model))
    assert all(m.training for m in model.modules())
    assert not model.features[0][0].weight.requires_grad and model.features[0][1].weight.requires_grad
    assert [tuple(b.shape) for b in first] == [(8, 1, 8, 8)] * 4 and not first[0].requires_grad
    second = synthesize_inputs(model, digits[0].tensors[0][:8], num_samples=32, steps=20, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


class MaskedConvNet(nn.Module):
    """Keyword inputs: float images and an integer per-sample flag (repeated, not optimised)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 10)

    def forward(self, image, keep):
        return self.fc(F.relu(self.bn(self.conv(image))).mean((2, 3))) * keep[:, None]


def test_dict_inputs_keep_their_integer_tensors():
    model = MaskedConvNet().eval()
    example = {"image": torch.randn(3, 1, 8, 8), "keep": torch.tensor([1, 0, 1])}
    (batch,) = synthesize_inputs(model, example, num_samples=6, steps=5)
    assert batch["image"].shape == (6, 1, 8, 8) and torch.equal(batch["keep"], torch.tensor([1, 0, 1, 1, 0, 1]))


def test_synthetic_calibration_needs_batchnorm_and_float_inputs():
    mlp = MLP()
    before = state(mlp)
    with pytest.raises(ValueError, match="no BatchNorm"):
        prune(mlp, torch.randn(4, 1, 8, 8), 0.5, calibration_data="synthetic")
    assert_same_state(before, state(mlp))
    embedding = nn.Sequential(nn.Embedding(10, 4), nn.BatchNorm1d(5))
    with pytest.raises(ValueError, match="floating-point inputs"):
        synthesize_inputs(embedding, torch.randint(0, 10, (2, 5)))
    with pytest.raises(ValueError, match="calibration_data must be an iterable of input batches or 'synthetic'"):
        prune(mlp, torch.randn(4, 1, 8, 8), 0.5, calibration_data="real")
    assert_same_state(before, state(mlp))
