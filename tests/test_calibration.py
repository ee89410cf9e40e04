"""BatchNorm statistics after pruning: measuring how far they are off, and re-estimating them."""

import copy

import pytest
import torch

from helpers import assert_same_state, state
from lightning_intrafusion import batchnorm_drift, prune, recalibrate_batchnorm
from lightning_intrafusion.models import SmallVGG

BATCH = torch.randn(64, 1, 8, 8)


def _vgg() -> SmallVGG:
    torch.manual_seed(0)
    return SmallVGG(width=8).eval()


def test_drift_is_nil_after_recalibrating_on_the_same_batch():
    model = _vgg()
    recalibrate_batchnorm(model, [BATCH])
    drift = batchnorm_drift(model, [BATCH])
    assert list(drift) == ["features.0.1", "features.1.1", "features.3.1", "features.4.1"]
    first = drift["features.0.1"]  # its input does not depend on any other BN: exact
    assert torch.allclose(first.variance_ratio, torch.ones(8), atol=1e-5)
    assert torch.allclose(first.mean_shift, torch.zeros(8), atol=1e-5)
    for d in drift.values():  # later BNs: eval mode normalises by the unbiased variance, train mode did not
        assert torch.allclose(d.variance_ratio, torch.ones_like(d.variance_ratio), atol=2e-2)
        assert d.mean_shift.abs().max() < 2e-2


def test_drift_follows_the_running_statistics_and_changes_nothing():
    model = _vgg()
    recalibrate_batchnorm(model, [BATCH])
    before = batchnorm_drift(model, [BATCH])["features.0.1"]
    bn = model.features[0][1]
    bn.running_var.mul_(4.0)
    model.train()
    snapshot = state(model)
    after = batchnorm_drift(model, [BATCH, BATCH], max_batches=1)["features.0.1"]
    assert torch.allclose(after.variance_ratio, before.variance_ratio / 4, rtol=1e-5)
    assert_same_state(state(model), snapshot)
    assert model.training and bn.training  # modes restored


def test_pruning_without_data_leaves_drift_that_recalibration_removes():
    model = _vgg()
    recalibrate_batchnorm(model, [BATCH])
    pruned = copy.deepcopy(model)
    prune(pruned, BATCH[:4], 0.5, method="default")
    last = batchnorm_drift(pruned, [BATCH])["features.4.1"]
    assert (last.variance_ratio - 1).abs().max() > 0.1  # inputs lost channels; statistics did not follow
    recalibrate_batchnorm(pruned, [BATCH])
    fixed = batchnorm_drift(pruned, [BATCH])["features.4.1"]
    assert (fixed.variance_ratio - 1).abs().max() < 2e-2


def test_drift_needs_a_batch():
    with pytest.raises(ValueError, match="no batch"):
        batchnorm_drift(_vgg(), [])


def test_output_variance_is_what_the_next_layer_receives():
    model = _vgg()
    recalibrate_batchnorm(model, [BATCH])
    drift = batchnorm_drift(model, [BATCH])["features.0.1"]
    with torch.no_grad():
        out = model.features[0][1](model.features[0][0](BATCH))
    assert torch.allclose(drift.output_variance, out.transpose(0, 1).flatten(1).var(1), rtol=1e-4)


@pytest.mark.parametrize("batches", [[], [torch.randn(4, 3, 8, 8)]], ids=["no batch", "rejected batch"])
def test_failed_recalibration_leaves_the_statistics_as_they_were(batches):
    model = _vgg()
    recalibrate_batchnorm(model, [BATCH])
    snapshot = state(model)
    with pytest.raises((ValueError, RuntimeError)):
        recalibrate_batchnorm(model, batches)
    assert_same_state(state(model), snapshot)
