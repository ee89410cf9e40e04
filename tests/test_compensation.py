"""Compensation with calibration data: the mean contribution of removed channels moves into the consumers'
biases ("mean"; exact where the removed channels are constant), or their best linear prediction from the
kept channels into the kept columns and the biases ("linear"; also exact where a removed channel is a
multiple of a kept one)."""

import copy

import pytest
import torch
from torch import nn

from helpers import EvenUnitsFirst, assert_same_state, halve_odd_heads, halve_odd_rows, odd_rows_at_cosine, state
from lightning_intrafusion import OTConfig, prune
import lightning_intrafusion.pruner as pruner
from lightning_intrafusion.compensation import InputStatistics, consumer_input_statistics, lost_mean_shifts
from lightning_intrafusion.fusion import ChannelSlice
from lightning_intrafusion.models import MLP, SmallTransformer, SmallVGG

X = torch.randn(16, 1, 8, 8)
BATCHES = [torch.randn(16, 1, 8, 8) for _ in range(3)]


def _pruned_pair(model, inputs, sparsity, compensation="mean", **kwargs):
    """The model pruned with calibration data, with and without compensation."""
    compensated, plain = copy.deepcopy(model), copy.deepcopy(model)
    report = prune(compensated, inputs, sparsity, calibration_data=BATCHES, compensation=compensation, **kwargs)
    prune(plain, inputs, sparsity, calibration_data=BATCHES, compensation="none", **kwargs)
    return compensated, plain, report


@pytest.mark.parametrize("compensation", ["mean", "linear"])
def test_removed_constant_neurons_are_compensated_exactly(compensation):
    torch.manual_seed(0)
    model = MLP(d_in=64, hidden=(32,)).eval()
    layer = model.body[0]
    with torch.no_grad():  # odd neurons ignore the input: ReLU(0.3 + 0.01 j), a constant
        layer.weight[1::2] = 0.0
        layer.bias[1::2] = 0.3 + 0.01 * torch.arange(16)
        expected = model(X)
    compensated, plain, _ = _pruned_pair(model, X, 0.5, compensation, method="default", importance=EvenUnitsFirst())
    assert compensated.body[0].out_features == 16
    with torch.no_grad():
        assert torch.allclose(compensated(X), expected, atol=1e-5)
        assert (plain(X) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("compensation", ["mean", "linear"])
def test_fusion_compensates_what_it_discards_and_nothing_it_merges(compensation):
    """Neurons 4m+1 duplicate neuron 4m (merged, exact); neurons 4m+3 are constants, unlike any kept
    neuron (discarded, compensated): the fused model computes exactly what the model computed."""
    torch.manual_seed(0)
    model = MLP(d_in=64, hidden=(32,)).eval()
    layer = model.body[0]
    with torch.no_grad():
        layer.weight[0::2] *= 10.0  # kept neurons are described by their input weights, not their outputs
        layer.weight[1::4] = layer.weight[0::4]
        layer.bias[1::4] = layer.bias[0::4]
        layer.weight[3::4] = 0.0
        layer.bias[3::4] = 0.3 + 0.01 * torch.arange(8)
        expected = model(X)
    compensated, plain, report = _pruned_pair(model, X, 0.5, compensation, importance=EvenUnitsFirst())
    assert [g.merged for g in report.groups] == [8]
    with torch.no_grad():
        assert torch.allclose(compensated(X), expected, atol=1e-5)
        assert (plain(X) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("attention, include, blocks", [("qkv", "*.attn.q", {"*.attn.q": 8}), ("torch", "*.attn", None)])
@pytest.mark.parametrize("compensation", ["mean", "linear"])
def test_removed_constant_heads_are_compensated_exactly(attention, include, blocks, compensation):
    """A head whose value projection ignores the input outputs its value bias whatever it attends to;
    nn.MultiheadAttention applies its output projection without calling it, so its mean input is solved
    from the module's mean output."""
    torch.manual_seed(0)
    model = SmallTransformer(dim=32, heads=4, mlp=64, attention=attention).eval()
    with torch.no_grad():
        for block in model.blocks:
            if attention == "qkv":
                rows = [block.attn.q.weight, block.attn.k.weight, block.attn.v.weight]
                block.attn.v.bias[8:16].normal_()
                block.attn.v.bias[24:32].normal_()
            else:
                rows = list(block.attn.in_proj_weight.chunk(3))
                block.attn.in_proj_bias.chunk(3)[2][8:16].normal_()
                block.attn.in_proj_bias.chunk(3)[2][24:32].normal_()
            for weight in rows:  # heads 1 and 3: no weights at all, so magnitude importance removes them
                weight[8:16] = 0.0
                weight[24:32] = 0.0
        expected = model(X)
    compensated, plain, _ = _pruned_pair(model, X, 0.5, compensation, include=[include], channel_blocks=blocks)
    assert all((b.attn.o.in_features == 16) if attention == "qkv" else (b.attn.num_heads == 2) for b in compensated.blocks)
    with torch.no_grad():
        # linear: moments of the attention output mapped back through out_proj carry float32 noise (5-10e-6 measured)
        assert torch.allclose(compensated(X), expected, atol=1e-5 if compensation == "mean" else 5e-5)
        assert (plain(X) - expected).abs().max() > 1e-2


def test_input_statistics_of_linear_conv_and_attention_layers():
    torch.manual_seed(0)
    model = SmallTransformer(dim=32, heads=4, mlp=64, attention="torch").eval()
    wanted = {"blocks.0.fc2.weight", "blocks.0.attn.out_proj.weight"}
    stats = consumer_input_statistics(model, BATCHES, second_moments=wanted)
    captured, outputs = [], []
    hooks = [model.blocks[0].fc2.register_forward_pre_hook(lambda m, args: captured.append(args[0])),
             model.blocks[0].attn.register_forward_hook(lambda m, args, out: outputs.append(out[0]))]
    with torch.no_grad():
        for batch in BATCHES:
            model(batch)
    for hook in hooks:
        hook.remove()
    direct = torch.cat(captured).reshape(-1, 64).double()
    fc2 = stats["blocks.0.fc2.weight"]
    assert torch.allclose(fc2.mean, direct.mean(0), atol=1e-10)
    assert torch.allclose(fc2.second_moment, direct.T @ direct / len(direct), atol=1e-10)
    # nn.MultiheadAttention applies out_proj without calling it: its input moments are solved from the output's
    attention = stats["blocks.0.attn.out_proj.weight"]
    assert attention.mean.shape == (32,) and attention.second_moment.shape == (32, 32)
    y = torch.cat(outputs).reshape(-1, 32).double()
    w, b = model.blocks[0].attn.out_proj.weight.double(), model.blocks[0].attn.out_proj.bias.double()
    assert torch.allclose(w @ attention.mean + b, y.mean(0), atol=1e-8)
    predicted = w @ attention.second_moment @ w.T + torch.outer(w @ attention.mean, b) + torch.outer(b, w @ attention.mean) + torch.outer(b, b)
    assert torch.allclose(predicted, y.T @ y / len(y), atol=1e-8)
    assert stats["blocks.1.fc2.weight"].second_moment is None  # only where asked
    assert not any(k.endswith(".output") for k in stats)
    conv = SmallVGG(width=8).eval()
    conv.features[0][0].bias = nn.Parameter(torch.zeros(8))  # a convolution with a bias sees per-channel means
    first = consumer_input_statistics(conv, BATCHES)["features.0.0.weight"].mean
    assert torch.allclose(first, torch.stack(BATCHES).double().mean(), atol=1e-10)
    assert "features.1.0.weight" not in consumer_input_statistics(conv, BATCHES)  # no bias: only when asked for
    asked = consumer_input_statistics(conv, BATCHES, keys={"features.1.0.weight"})
    assert set(asked) == {"features.1.0.weight"} and not asked["features.1.0.weight"].has_bias


def test_shift_of_partly_merged_channels_counts_only_what_was_lost():
    weight = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    consumer = ChannelSlice("fc.weight", weight, 1, torch.arange(3)[:, None], "consumer")
    means = {"fc.weight": InputStatistics(torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64))}
    shifts = lost_mean_shifts([consumer], means, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(shifts["fc.weight"], torch.tensor([0.5 * 2 * 10 + 3 * 100, 0.5 * 5 * 10 + 6 * 100], dtype=torch.float64))


def test_with_compensated_means_only_closer_neurons_are_merged():
    """Neuron 2m+1 is neuron 2m plus an orthogonal part (cosine 0.55, distance 0.95 between normalised features):
    merged without data (max_cost_without_bn=1.3), dropped with its mean compensated (0.9)."""
    torch.manual_seed(0)
    model = MLP(d_in=64, hidden=(32,)).eval()
    odd_rows_at_cosine(model.body[0], 0.55)
    counts = {}
    mean = {"calibration_data": BATCHES, "compensation": "mean"}
    for label, kwargs in {"no data": {}, "compensated": mean,
                          "as without data": dict(mean, ot_config=OTConfig(max_cost_without_bn_compensated=None))}.items():
        report = prune(copy.deepcopy(model), X, 0.5, importance=EvenUnitsFirst(), **kwargs)
        counts[label] = report.groups[0].merged
    assert counts == {"no data": 16, "compensated": 0, "as without data": 16}


def test_calibration_from_a_one_shot_iterator_serves_both_repairs():
    torch.manual_seed(0)
    model = SmallVGG(width=8).eval()
    reference = copy.deepcopy(model)
    prune(model, X, 0.5, calibration_data=iter(BATCHES))
    prune(reference, X, 0.5, calibration_data=BATCHES)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_without_batchnorm_calibration_keeps_exact_plans():
    """solver="auto" takes Sinkhorn only where BatchNorm statistics are re-estimated: a model without
    BatchNorm fuses with the same exact plans with or without calibration data."""
    torch.manual_seed(0)
    model = SmallTransformer(dim=32, heads=4, mlp=64).eval()
    data_free, calibrated = copy.deepcopy(model), copy.deepcopy(model)
    prune(data_free, X, 0.5, include=["*.fc1"], compensation="none")
    prune(calibrated, X, 0.5, include=["*.fc1"], calibration_data=BATCHES, compensation="none")
    assert all(torch.equal(a, b) for a, b in zip(data_free.state_dict().values(), calibrated.state_dict().values()))


def test_rejected_calibration_batch_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = MLP(d_in=64, hidden=(32,)).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError):
        prune(model, X, 0.5, calibration_data=[torch.randn(4, 3)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------- linear compensation
# ReLU is positively homogeneous: a neuron (or channel) whose weights and bias are twice those of another
# outputs exactly twice what the other does, so linear compensation of the removed one is exact, up to the
# shrinkage of its ridge (1e-3 of the kept inputs' mean variance), while mean compensation is not.


def _errors(model, inputs, sparsity, **kwargs):
    """Largest output error of the model pruned with calibration data, per compensation."""
    with torch.no_grad():
        expected = model(inputs)
        errors = {}
        for compensation in ("linear", "mean", "none"):
            pruned = copy.deepcopy(model)
            prune(pruned, inputs, sparsity, calibration_data=BATCHES, compensation=compensation, **kwargs)
            errors[compensation] = (pruned(inputs) - expected).abs().max().item()
    return errors


@pytest.mark.parametrize("bias", [True, False])
def test_linear_compensation_restores_a_removed_multiple_of_a_kept_neuron(bias):
    """Without a bias in the consumer, the prediction has no intercept (uncentred least squares) and
    mean compensation has nothing to carry it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10, bias=bias)).eval()
    halve_odd_rows(model[1])  # the removed (odd) neurons: half of the kept ones
    errors = _errors(model, X, 0.5, method="default", importance=EvenUnitsFirst())
    assert errors["linear"] < 1e-2 * errors["none"]
    assert errors["mean"] > 0.3 * errors["none"]  # the mean of a varying neuron is not the neuron
    if not bias:  # nothing to carry a mean: the same weights as without compensation (compared as weights, since
        # two forwards of equal models may round differently on the CPU)
        pruned = {c: copy.deepcopy(model) for c in ("mean", "none")}
        for compensation, m in pruned.items():
            prune(m, X, 0.5, method="default", importance=EvenUnitsFirst(), calibration_data=BATCHES, compensation=compensation)
        assert_same_state(state(pruned["mean"]), state(pruned["none"]))


@pytest.mark.parametrize("consumer", ["conv", "flatten-linear"])
def test_linear_compensation_of_convolution_and_flatten_consumers(consumer):
    """A convolution reads a channel at every pixel and kernel tap (one coefficient per input channel);
    a linear layer after a flatten reads it at 64 positions (one coefficient per position)."""
    torch.manual_seed(0)
    tail = [nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 10)] if consumer == "conv" \
        else [nn.Flatten(), nn.Linear(8 * 64, 10)]
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), *tail).eval()
    halve_odd_rows(model[0])
    errors = _errors(model, X, 0.5, method="default", include=["0"], importance=EvenUnitsFirst())
    assert model[0].out_channels == 8
    assert errors["linear"] < 1e-2 * errors["none"] and errors["mean"] > 0.3 * errors["none"]


def test_linear_compensation_of_attention_heads_solved_through_the_output_projection():
    """Heads 1 and 3 attend like heads 0 and 2 with half their values: their outputs are half those of the
    kept heads, which out_proj (applied inside nn.MultiheadAttention) gets back through its columns."""
    torch.manual_seed(0)
    model = SmallTransformer(dim=32, heads=4, mlp=64, attention="torch").eval()
    halve_odd_heads(model)
    errors = _errors(model, X, 0.5, method="default", include=["*.attn"])
    assert errors["linear"] < 1e-2 * errors["none"] and errors["mean"] > 0.3 * errors["none"]


def test_consumers_wider_than_the_limit_get_mean_compensation(monkeypatch):
    torch.manual_seed(0)
    model = MLP(d_in=64, hidden=(32,)).eval()
    means, limited = copy.deepcopy(model), copy.deepcopy(model)
    prune(means, X, 0.5, calibration_data=BATCHES, compensation="mean")
    monkeypatch.setattr(pruner, "LINEAR_MAX_WIDTH", 16)  # the head reads 32 neurons
    prune(limited, X, 0.5, calibration_data=BATCHES, compensation="linear")
    assert all(torch.equal(a, b) for a, b in zip(means.state_dict().values(), limited.state_dict().values()))


def test_unknown_compensation_is_refused_before_anything_changes():
    model = MLP(d_in=64, hidden=(32,)).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="compensation 'ridge'"):
        prune(model, X, 0.5, calibration_data=BATCHES, compensation="ridge")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("compensation", ["mean", "linear"])
def test_non_finite_calibration_inputs_are_refused_before_anything_changes(compensation):
    model = MLP(d_in=64, hidden=(32,)).eval()
    before = copy.deepcopy(model.state_dict())
    poisoned = [BATCHES[0], torch.full_like(BATCHES[1], float("nan"))]
    with pytest.raises(ValueError, match="non-finite .* layer 'head'"):
        prune(model, X, 0.5, calibration_data=poisoned, compensation=compensation)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

