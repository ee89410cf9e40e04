"""Layer-wise refit with calibration data (``compensation="refit"``): every pruned layer, in forward order,
reproduces the unpruned layer's kept outputs from the inputs it now receives."""

import copy

import pytest
import torch
from torch import nn

import lightning_intrafusion.pruner as pruner
from helpers import (EvenUnitsFirst, assert_same_state, duplicate_odd_units, halve_odd_heads, halve_odd_rows,
                     randomize_batchnorm, state)
from lightning_intrafusion import prune
from lightning_intrafusion.models import SmallVGG
from lightning_intrafusion.reconstruction import record_outputs, refit_layers

X = torch.randn(16, 1, 8, 8)
BATCHES = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]


def _error(model, pruned):
    with torch.no_grad():
        return (pruned(X) - model(X)).abs().max().item()


@pytest.mark.parametrize("method", ["default", "intrafusion"])
def test_refit_restores_removed_multiples_of_kept_neurons_through_two_pruned_groups(method):
    """Both hidden layers lose their odd neurons, each half of an even one (ReLU is positively homogeneous):
    refitting the middle layer (consumer of the first group, producer of the second) and the head in forward
    order reproduces the outputs (to the ridge's shrinkage); plain removal does not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    halve_odd_rows(model[1])
    halve_odd_rows(model[3])
    errors = {}
    for compensation in ("refit", "none"):
        pruned = copy.deepcopy(model)
        prune(pruned, X, 0.5, method=method, importance=EvenUnitsFirst(), calibration_data=BATCHES, compensation=compensation)
        assert pruned[3].weight.shape == (16, 16)
        errors[compensation] = _error(model, pruned)
    assert errors["refit"] < 2e-2 * errors["none"], errors  # what is left: the ridge (1e-3, toward the pruned weights)


def test_under_the_refit_intrafusion_merges_nothing_and_equals_plain_pruning():
    """The refit reproduces every kept channel's own unpruned output; a merge into it would leave merged BN
    parameters and consumer columns behind (on the digits benchmark it cost up to 1.1 points at 70%). With
    duplicated channels, which fusion would merge, both methods give the very same model."""
    torch.manual_seed(0)
    model = SmallVGG(width=8)
    randomize_batchnorm(model)
    duplicate_odd_units(model, X, consumers=True)  # twins in every tensor: merged whenever fusion merges
    model.eval()
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    kwargs = dict(importance=EvenUnitsFirst(), calibration_data=BATCHES)  # every removed unit has its twin kept
    report = prune(fused, X, 0.5, compensation="refit", **kwargs)
    prune(plain, X, 0.5, method="default", compensation="refit", **kwargs)
    assert report.groups and all(g.merged == 0 for g in report.groups)
    assert_same_state(state(fused), state(plain))
    linear = prune(copy.deepcopy(model), X, 0.5, **kwargs)  # with linear compensation they are
    assert sum(g.merged for g in linear.groups) > 0


def test_refit_of_convolutions_reproduces_the_kept_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 64, 10)).eval()
    halve_odd_rows(model[0])
    pruned, plain = copy.deepcopy(model), copy.deepcopy(model)
    prune(pruned, X, 0.5, method="default", include=["0"], importance=EvenUnitsFirst(), calibration_data=BATCHES,
          compensation="refit")
    prune(plain, X, 0.5, method="default", include=["0"], importance=EvenUnitsFirst())
    assert pruned[2].in_channels == 4
    assert _error(model, pruned) < 1e-2 * _error(model, plain)


def test_only_layers_of_pruned_groups_are_refit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    pruned = copy.deepcopy(model)
    prune(pruned, X, 0.5, include=["1"], calibration_data=BATCHES, compensation="refit")
    assert pruned[3].in_features == 16 and pruned[3].out_features == 32
    assert torch.equal(pruned[5].weight, model[5].weight) and torch.equal(pruned[5].bias, model[5].bias)
    assert not torch.equal(pruned[3].weight, model[3].weight[:, :16])  # the consumer was refit


def test_a_failing_refit_leaves_the_model_as_it_was(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    before = state(model)

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure in the refit")

    monkeypatch.setattr(pruner, "refit_layers", fail)
    with pytest.raises(RuntimeError, match="injected"):
        prune(model, X, 0.5, calibration_data=BATCHES, compensation="refit")
    assert_same_state(before, state(model))


def test_outputs_are_recorded_in_the_order_the_forward_calls_the_layers():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(8, 4)
            self.early = nn.Linear(64, 8)

        def forward(self, x):
            return self.late(torch.relu(self.early(x.flatten(1))))

    model = Reversed()
    outputs = record_outputs(model, BATCHES, ["late", "early"])
    assert list(outputs) == ["early", "late"]
    assert [o.shape for o in outputs["late"]] == [(16, 4)] * len(BATCHES)
    with torch.no_grad():
        assert torch.equal(outputs["early"][1], model.early(BATCHES[1].flatten(1)))


class _TwoReaders(nn.Module):
    """``a`` and ``b`` read one input (with ``in_place``, ``a``'s output is first added into it); ``c`` reads both
    outputs."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 16), nn.Linear(80, 10)

    def forward(self, x):
        x = x.flatten(1).clone()  # not the caller's batch
        a = torch.relu(self.a(x))
        if self.in_place:
            x.add_(a)
        return self.c(torch.cat([a, self.b(x)], 1))


@pytest.mark.parametrize("in_place, passes", [(False, 2), (True, 3)], ids=["shared input", "modified in place"])
def test_layers_reading_the_same_input_are_refit_from_one_pass(in_place, passes):
    """One pass over the batches for a and b together, one for c; when a's output changes the input in place
    before b reads it, b waits for a pass after a's refit. Either way each layer gets the refit of its own pass:
    the result equals refitting the layers one pass each."""
    torch.manual_seed(0)
    unpruned = _TwoReaders(in_place).eval()
    names = ["a", "b", "c"]
    targets = record_outputs(unpruned, BATCHES, names)
    damaged = copy.deepcopy(unpruned)
    with torch.no_grad():
        for name in names:
            getattr(damaged, name).weight.mul_(0.5)
    calls = []
    damaged.register_forward_pre_hook(lambda module, args: calls.append(1))
    grouped = copy.deepcopy(damaged)
    assert refit_layers(grouped, BATCHES, targets, {}) == names
    assert len(calls) == passes * len(BATCHES)
    one_by_one = copy.deepcopy(damaged)
    for name in names:
        refit_layers(one_by_one, BATCHES, {name: targets[name]}, {})
    assert_same_state(state(grouped), state(one_by_one))
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():  # held-out inputs: far closer to the unpruned outputs than before the refit
        assert (grouped(x) - unpruned(x)).abs().mean() < 0.25 * (damaged(x) - unpruned(x)).abs().mean()


def test_stored_rows_are_capped_and_the_refit_uses_the_same_rows(monkeypatch):
    import lightning_intrafusion.reconstruction as reconstruction

    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1))
    kept = record_outputs(conv, BATCHES[:2], ["0"], limit=5)["0"]
    with torch.no_grad():
        full = conv(BATCHES[1]).movedim(1, -1).reshape(-1, 4)
    assert [t.shape for t in kept] == [(5, 4)] * 2
    assert torch.equal(kept[1], full[reconstruction.rows_kept(len(full), 5)])
    assert reconstruction.row_limit([conv[0]], batches=8) == reconstruction.MAX_ROWS
    monkeypatch.setattr(reconstruction, "MAX_STORED", 4 * 8 * 100)  # 100 rows of 4 outputs per batch
    assert reconstruction.row_limit([conv[0]], batches=8) == 100
    # under this budget the conv net below keeps 64 (MIN_ROWS) of the 1024 rows of each batch, and its refit still
    # restores the kept outputs
    test_refit_of_convolutions_reproduces_the_kept_outputs()


def test_a_refit_that_only_fits_its_own_samples_is_not_kept():
    """Four calibration samples for 33 unknowns per output: fitted on half the batches, a refit predicts the
    others worse than the step's weights, so the layer keeps them (and the step equals no repair)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    tiny = [torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    refit, plain = copy.deepcopy(model), copy.deepcopy(model)
    prune(refit, X, 0.5, method="default", calibration_data=tiny, compensation="refit")
    prune(plain, X, 0.5, method="default")
    assert_same_state(state(plain), state(refit))


def test_the_output_projection_of_nn_multihead_attention_is_refit_through_the_module_output():
    """nn.MultiheadAttention applies out_proj without calling it: the refit records the module's output and
    solves the projection's input from it. Heads 1 and 3 attend like heads 0 and 2 with half their values,
    so their removal is undone exactly (to the ridge)."""
    from lightning_intrafusion.models import SmallTransformer

    torch.manual_seed(0)
    model = SmallTransformer(dim=32, heads=4, mlp=64, attention="torch").eval()
    halve_odd_heads(model)
    errors = {}
    for compensation in ("refit", "none"):
        pruned = copy.deepcopy(model)
        prune(pruned, X, 0.5, method="default", include=["*.attn"], calibration_data=BATCHES, compensation=compensation)
        assert all(b.attn.num_heads == 2 for b in pruned.blocks)
        errors[compensation] = _error(model, pruned)
    assert errors["refit"] < 2e-2 * errors["none"], errors
