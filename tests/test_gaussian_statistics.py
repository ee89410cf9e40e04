"""Data-free input statistics (every norm outputting its affine map of standard normal values) and the
compensation that data-free Intra-Fusion builds on them, for groups without BatchNorm."""

import copy
import math

import pytest
import torch
from torch import nn

from helpers import EvenUnitsFirst, assert_same_state, state
from lightning_intrafusion import OTConfig, prune
from lightning_intrafusion import gaussian_statistics
from lightning_intrafusion.gaussian_statistics import gaussian_input_statistics
from lightning_intrafusion.models import SmallTransformer, SmallVGG


def _layer_norm_mlp(d=16, hidden=64, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d)).eval()
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 2.0)
        model[0].bias.uniform_(-1.0, 1.0)
    return model


def test_a_layer_behind_a_layernorm_sees_its_affine_map_of_standard_normal_values():
    model = _layer_norm_mlp()
    weight, bias = model[0].weight.detach().double(), model[0].bias.detach().double()
    stats = gaussian_input_statistics(model, torch.randn(64, 16), {"1.weight"}, {"1.weight"})["1.weight"]
    assert stats.samples >= 4096
    bound = 5 * weight.max() / math.sqrt(stats.samples)
    assert torch.allclose(stats.mean, bias, atol=float(bound))
    variance = stats.second_moment.diagonal() - stats.mean.pow(2)
    assert torch.allclose(variance, weight.pow(2), rtol=0.15)


def test_a_layer_behind_batchnorm_and_relu_sees_rectified_normals_of_the_bn_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-3, 3)
        bn.running_var.uniform_(0.5, 4)
        bn.weight.copy_(torch.tensor([1.0, 0.5, 2.0, 1.5]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    stats = gaussian_input_statistics(model, torch.randn(8, 1, 8, 8), {"3.weight"})["3.weight"]
    mu, sigma = bn.bias.detach().double(), bn.weight.detach().double()
    normal = torch.distributions.Normal(0.0, 1.0)
    ratio = mu / sigma
    expected = mu * normal.cdf(ratio) + sigma * normal.log_prob(ratio).exp()  # E[relu(N(mu, sigma^2))]
    assert torch.allclose(stats.mean, expected, atol=float(5 * sigma.max() / math.sqrt(stats.samples)))


class _TwoPaths(nn.Module):
    """Token ids embedded; one layer reads the embeddings directly, one through a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.norm = nn.LayerNorm(16)
        self.direct = nn.Linear(16, 4)
        self.after_norm = nn.Linear(16, 4)

    def forward(self, ids):
        e = self.embed(ids)
        return self.direct(e) + self.after_norm(self.norm(e))


def test_input_values_are_never_read_and_layers_depending_on_them_get_no_statistics():
    model = _layer_norm_mlp()
    first = gaussian_input_statistics(model, torch.randn(8, 16), {"1.weight", "3.weight"})
    second = gaussian_input_statistics(model, torch.full((8, 16), 7.0), {"1.weight", "3.weight"})
    assert first.keys() == second.keys() == {"1.weight", "3.weight"}
    assert all(torch.equal(first[k].mean, second[k].mean) for k in first)
    # a layer that reads the (float) inputs themselves
    direct = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4)).eval()
    assert gaussian_input_statistics(direct, torch.randn(8, 16), {"0.weight", "2.weight"}).keys() == {"2.weight"}
    # token ids reach "direct" other than through a norm
    ids = torch.arange(16).reshape(2, 8) % 10
    assert gaussian_input_statistics(_TwoPaths().eval(), ids, {"direct.weight", "after_norm.weight"}).keys() == {"after_norm.weight"}
    # no norm at all: nothing to model
    assert gaussian_input_statistics(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), torch.randn(8, 16),
                                     {"2.weight"}) == {}


def test_statistics_are_deterministic_and_leave_the_model_as_it_was():
    model = _layer_norm_mlp().train()
    before = state(model)
    first = gaussian_input_statistics(model, torch.randn(8, 16), {"3.weight"}, {"3.weight"})
    second = gaussian_input_statistics(model, torch.randn(8, 16), {"3.weight"}, {"3.weight"})
    assert torch.equal(first["3.weight"].second_moment, second["3.weight"].second_moment)
    assert_same_state(before, state(model))
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _output_error(model, pruned, inputs):
    with torch.no_grad():
        return (model(inputs) - pruned(inputs)).pow(2).mean().item()


def test_data_free_fusion_predicts_what_it_removes_from_the_modelled_inputs():
    """Inputs that follow the model (a LayerNorm standardises any input): with the data-free compensation the
    pruned block's outputs are far closer to the unpruned ones than without it, and plain pruning is untouched."""
    model = _layer_norm_mlp()
    example, fresh = torch.randn(4, 16), torch.randn(2048, 16)
    ours, without, plain, plain_off = (copy.deepcopy(model) for _ in range(4))
    prune(ours, example, 0.5)
    prune(without, example, 0.5, ot_config=OTConfig(gaussian_compensation=False))
    prune(plain, example, 0.5, method="default")
    prune(plain_off, example, 0.5, method="default", ot_config=OTConfig(gaussian_compensation=False))
    assert_same_state(state(plain), state(plain_off))
    assert not torch.equal(ours[3].weight, without[3].weight)
    assert _output_error(model, ours, fresh) < 0.5 * min(_output_error(model, without, fresh), _output_error(model, plain, fresh))


@pytest.mark.parametrize("include, compensated", [(["features.*"], False), (["classifier.1"], True)])
def test_only_groups_without_batchnorm_are_compensated_without_data(include, compensated):
    torch.manual_seed(0)
    model = SmallVGG(width=8).eval()
    images = torch.randn(4, 1, 8, 8)
    ours, without = copy.deepcopy(model), copy.deepcopy(model)
    prune(ours, images, 0.5, include=include)
    prune(without, images, 0.5, include=include, ot_config=OTConfig(gaussian_compensation=False))
    # the classifier's hidden neurons (no BatchNorm) are consumed by classifier.3
    assert torch.equal(ours.classifier[3].weight, without.classifier[3].weight) != compensated
    if not compensated:
        assert_same_state(state(ours), state(without))


def test_second_moments_beyond_the_budget_leave_the_mean_repair(monkeypatch):
    model = _layer_norm_mlp()
    example = torch.randn(4, 16)
    linear, mean, unlimited = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    prune(unlimited, example, 0.5)
    monkeypatch.setattr(gaussian_statistics, "SECOND_MOMENT_BUDGET", 64 * 64 - 1)  # the consumer's E[x x^T] has 64^2 values
    prune(linear, example, 0.5)
    prune(mean, example, 0.5, compensation="mean")
    assert_same_state(state(linear), state(mean))
    assert not torch.equal(linear[3].weight, unlimited[3].weight)


@pytest.mark.parametrize("compensation", ["none", "refit"])
def test_no_data_free_compensation_where_compensation_is_off_or_needs_data(compensation):
    model = _layer_norm_mlp()
    example = torch.randn(4, 16)
    asked, off = copy.deepcopy(model), copy.deepcopy(model)
    prune(asked, example, 0.5, compensation=compensation)
    prune(off, example, 0.5, ot_config=OTConfig(gaussian_compensation=False))
    assert_same_state(state(asked), state(off))


def test_a_width_that_passes_through_norms_is_not_compensated_on_modelled_inputs():
    """A residual stream's channels are the norms' own channels: modelled as independent, none predicts another,
    so such a group (here GPT-2's hidden width) is fused as without the compensation."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 50, (2, 8)), "use_cache": False}
    ours, without = copy.deepcopy(model), copy.deepcopy(model)
    prune(ours, inputs, 0.25, include=["transformer.wte"])
    prune(without, inputs, 0.25, include=["transformer.wte"], ot_config=OTConfig(gaussian_compensation=False))
    assert_same_state(state(ours), state(without))
    mlp, mlp_without = copy.deepcopy(model), copy.deepcopy(model)  # its MLP neurons are compensated
    prune(mlp, inputs, 0.25, include=["*.mlp.c_fc"])
    prune(mlp_without, inputs, 0.25, include=["*.mlp.c_fc"], ot_config=OTConfig(gaussian_compensation=False))
    assert not torch.equal(mlp.transformer.h[0].mlp.c_proj.weight, mlp_without.transformer.h[0].mlp.c_proj.weight)


class _OneEndTokenPerRow(nn.Module):
    """Rejects ids with other than one end token (id 1) per row, as Hugging Face's BART classifier does."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 16)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, ids):
        if not bool(((ids == 1).sum(1) == 1).all()):
            raise ValueError("All examples must have the same number of <eos> tokens.")
        return self.fc2(torch.relu(self.fc1(self.norm(self.embed(ids))))).mean(1)


def test_a_model_rejecting_modelled_inputs_is_pruned_without_the_compensation_and_a_warning():
    torch.manual_seed(0)
    model = _OneEndTokenPerRow().eval()
    ids = torch.tensor([[2, 3, 4, 1], [5, 2, 3, 1]])
    with pytest.warns(UserWarning, match="rejected modelled inputs"):
        assert gaussian_input_statistics(model, ids, {"fc2.weight"}) == {}
    ours, without = copy.deepcopy(model), copy.deepcopy(model)
    with pytest.warns(UserWarning, match="rejected modelled inputs"):
        prune(ours, ids, 0.5)
    prune(without, ids, 0.5, ot_config=OTConfig(gaussian_compensation=False))
    assert_same_state(state(ours), state(without))


# --- OTConfig(compensate_merged=True): merge by OT, then regress on the merged kept channels ---------------------

def _duplicated_layer_norm_mlp(d=8, distinct=6, seed=0):
    """A LayerNorm MLP whose hidden neuron 2m+1 is a copy of neuron 2m, each with half of one output column:
    keeping the even neurons (:class:`EvenUnitsFirst`) and merging the odd ones into them keeps the function."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * distinct), nn.ReLU(), nn.Linear(2 * distinct, d)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(distinct, d).repeat_interleave(2, 0))
        model[1].bias.copy_(torch.randn(distinct).repeat_interleave(2))
        model[3].weight.copy_(torch.randn(d, distinct).repeat_interleave(2, 1) / 2)
    return model


def test_compensating_merged_channels_keeps_exact_duplicates_exact():
    model = _duplicated_layer_norm_mlp()
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    report = prune(fused, torch.randn(4, 8), 0.5, importance=EvenUnitsFirst(), ot_config=OTConfig(compensate_merged=True))
    prune(plain, torch.randn(4, 8), 0.5, importance=EvenUnitsFirst(), method="default")
    assert fused[1].out_features == 6 and report.groups[0].merged == 6
    x = torch.randn(256, 8)
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-4)
    assert _output_error(model, plain, x) > 1e-2


def test_compensating_merged_channels_improves_on_merging_alone_on_inputs_that_follow_the_model():
    """The regression on the merged kept neurons (moments before and after fusion, paired on the Gaussian model)
    leaves the pruned block closer to the unpruned one than the merge alone, on inputs the model describes."""
    model = _layer_norm_mlp(hidden=64)
    example, fresh = torch.randn(4, 16), torch.randn(2048, 16)
    merged, alone = copy.deepcopy(model), copy.deepcopy(model)
    report = prune(merged, example, 0.5, ot_config=OTConfig(compensate_merged=True))
    prune(alone, example, 0.5, ot_config=OTConfig(gaussian_compensation=False))
    assert report.groups[0].merged > 0  # merged by OT as without compensation (max_cost_without_bn) ...
    assert torch.equal(merged[1].weight, alone[1].weight)  # ... the same producer rows as OT alone
    assert _output_error(model, merged, fresh) < 0.7 * _output_error(model, alone, fresh)


def test_joint_statistics_pair_the_passes_before_and_after_a_change():
    """Unchanged model: both halves of the joint moments are the same stream (mean, covariance and cross
    covariance agree); after a change to the producer, the 'before' half is still the unchanged model's."""
    from lightning_intrafusion.snapshot import ModelSnapshot

    model = _layer_norm_mlp(hidden=8)
    before = ModelSnapshot(model)
    joint = gaussian_statistics.gaussian_joint_statistics(model, before, torch.randn(4, 16), {"3.weight"}, {"3.weight"})
    stats = joint["3.weight"]
    m = 8
    assert torch.allclose(stats.mean[:m], stats.mean[m:])
    assert torch.allclose(stats.second_moment[:m, :m], stats.second_moment[:m, m:])
    with torch.no_grad():
        model[1].weight.data = model[1].weight.data * 2.0  # rebound, as fusion does
    changed = gaussian_statistics.gaussian_joint_statistics(model, before, torch.randn(4, 16), {"3.weight"}, {"3.weight"})
    again = changed["3.weight"]
    assert torch.allclose(again.mean[:m], stats.mean[:m])  # the snapshot's state, the same modelled passes
    assert not torch.allclose(again.mean[m:], again.mean[:m])
    assert torch.allclose(again.second_moment[:m, :m], stats.second_moment[:m, :m])


def test_compensating_merged_heads_of_multihead_attention_solves_its_projection_inputs():
    """``nn.MultiheadAttention`` applies its output projection without calling it: its inputs before and after
    fusion are solved from the module's outputs, so the heads' consumer gets the regression (without it the
    projection would be OT alone's: no head is merged here)."""
    torch.manual_seed(0)
    model = SmallTransformer(dim=32, heads=4, mlp=64, attention="torch").eval()
    images = torch.randn(4, 1, 8, 8)
    merged, alone = copy.deepcopy(model), copy.deepcopy(model)
    prune(merged, images, 0.5, include=["*.attn"], ot_config=OTConfig(compensate_merged=True))
    prune(alone, images, 0.5, include=["*.attn"], ot_config=OTConfig(gaussian_compensation=False))
    first = model.blocks[0].attn.out_proj.weight.shape
    assert merged.blocks[0].attn.out_proj.weight.shape == (first[0], first[1] // 2)
    assert not torch.equal(merged.blocks[0].attn.out_proj.weight, alone.blocks[0].attn.out_proj.weight)
    assert torch.isfinite(merged(images)).all()
