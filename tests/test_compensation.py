"""Mean compensation with calibration data: the mean contribution of removed channels moves into the
consumers' biases. Exact where the removed channels are constant."""

import copy

import pytest
import torch
from torch import nn

from helpers import EvenUnitsFirst
from lightning_intrafusion import OTConfig, prune
from lightning_intrafusion.compensation import consumer_input_means, lost_mean_shifts
from lightning_intrafusion.fusion import ChannelSlice
from lightning_intrafusion.models import MLP, SmallTransformer, SmallVGG

X = torch.randn(16, 1, 8, 8)
BATCHES = [torch.randn(16, 1, 8, 8) for _ in range(3)]


def _pruned_pair(model, inputs, sparsity, **kwargs):
    """The model pruned with calibration data, with and without mean compensation."""
    compensated, plain = copy.deepcopy(model), copy.deepcopy(model)
    report = prune(compensated, inputs, sparsity, calibration_data=BATCHES, **kwargs)
    prune(plain, inputs, sparsity, calibration_data=BATCHES, compensate_means=False, **kwargs)
    return compensated, plain, report


def test_removed_constant_neurons_are_compensated_exactly():
    torch.manual_seed(0)
    model = MLP(d_in=64, hidden=(32,)).eval()
    layer = model.body[0]
    with torch.no_grad():  # odd neurons ignore the input: ReLU(0.3 + 0.01 j), a constant
        layer.weight[1::2] = 0.0
        layer.bias[1::2] = 0.3 + 0.01 * torch.arange(16)
        expected = model(X)
    compensated, plain, _ = _pruned_pair(model, X, 0.5, method="default", importance=EvenUnitsFirst())
    assert compensated.body[0].out_features == 16
    with torch.no_grad():
        assert torch.allclose(compensated(X), expected, atol=1e-5)
        assert (plain(X) - expected).abs().max() > 1e-2


def test_fusion_compensates_what_it_discards_and_nothing_it_merges():
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
    compensated, plain, report = _pruned_pair(model, X, 0.5, importance=EvenUnitsFirst())
    assert [g.merged for g in report.groups] == [8]
    with torch.no_grad():
        assert torch.allclose(compensated(X), expected, atol=1e-5)
        assert (plain(X) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("attention, include, blocks", [("qkv", "*.attn.q", {"*.attn.q": 8}), ("torch", "*.attn", None)])
def test_removed_constant_heads_are_compensated_exactly(attention, include, blocks):
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
    compensated, plain, _ = _pruned_pair(model, X, 0.5, include=[include], channel_blocks=blocks)
    assert all((b.attn.o.in_features == 16) if attention == "qkv" else (b.attn.num_heads == 2) for b in compensated.blocks)
    with torch.no_grad():
        assert torch.allclose(compensated(X), expected, atol=1e-5)
        assert (plain(X) - expected).abs().max() > 1e-2


def test_input_means_of_linear_conv_and_attention_layers():
    torch.manual_seed(0)
    model = SmallTransformer(dim=32, heads=4, mlp=64, attention="torch").eval()
    means = consumer_input_means(model, BATCHES)
    captured = []
    hook = model.blocks[0].fc2.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        for batch in BATCHES:
            model(batch)
    hook.remove()
    direct = torch.cat(captured).reshape(-1, 64).double().mean(0)
    assert torch.allclose(means["blocks.0.fc2.weight"], direct, atol=1e-10)
    assert means["blocks.0.attn.out_proj.weight"].shape == (32,)
    assert "blocks.0.attn.out_proj.output" not in means
    conv = SmallVGG(width=8).eval()
    conv.features[0][0].bias = nn.Parameter(torch.zeros(8))  # a convolution with a bias sees per-channel means
    first = consumer_input_means(conv, BATCHES)["features.0.0.weight"]
    assert torch.allclose(first, torch.stack(BATCHES).double().mean(), atol=1e-10)
    assert "features.1.0.weight" not in consumer_input_means(conv, BATCHES)  # no bias to carry a shift


def test_shift_of_partly_merged_channels_counts_only_what_was_lost():
    weight = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    consumer = ChannelSlice("fc.weight", weight, 1, torch.arange(3)[:, None], "consumer")
    means = {"fc.weight": torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)}
    shifts = lost_mean_shifts([consumer], means, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(shifts["fc.weight"], torch.tensor([0.5 * 2 * 10 + 3 * 100, 0.5 * 5 * 10 + 6 * 100], dtype=torch.float64))


def test_with_compensated_means_only_closer_neurons_are_merged():
    """Neuron 2m+1 is neuron 2m plus an orthogonal part 1.5 times as long (cosine 0.55, distance 0.94):
    merged without data (max_cost_without_bn=1.2), dropped with its mean compensated (0.9)."""
    torch.manual_seed(0)
    model = MLP(d_in=64, hidden=(32,)).eval()
    layer = model.body[0]
    with torch.no_grad():
        rows = torch.linalg.qr(torch.randn(64, 32)).Q.T * 10.0  # orthogonal rows, dominating the features
        layer.weight.copy_(rows)
        layer.weight[1::2] = rows[0::2] + 1.5 * rows[1::2]
        layer.weight[1::2] *= 10.0 / layer.weight[1::2].norm(dim=1, keepdim=True)
    counts = {}
    for label, kwargs in {"no data": {}, "compensated": {"calibration_data": BATCHES},
                          "as without data": {"calibration_data": BATCHES,
                                              "ot_config": OTConfig(max_cost_without_bn_compensated=None)}}.items():
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
    prune(data_free, X, 0.5, include=["*.fc1"])
    prune(calibrated, X, 0.5, include=["*.fc1"], calibration_data=BATCHES, compensate_means=False)
    assert all(torch.equal(a, b) for a, b in zip(data_free.state_dict().values(), calibrated.state_dict().values()))


def test_rejected_calibration_batch_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = MLP(d_in=64, hidden=(32,)).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError):
        prune(model, X, 0.5, calibration_data=[torch.randn(4, 3)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
