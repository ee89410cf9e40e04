"""prune(): shapes, determinism, inputs, reports, persistence, and all-or-nothing failures."""

import copy
from dataclasses import replace

import pytest
import torch
import torch_pruning
from torch import nn

from helpers import (
    ChannelShuffleNet, EvenUnitsFirst, HeadCountNet, assert_same_state, duplicate_odd_units, odd_rows_at_cosine,
    randomize_batchnorm, refused_untouched_then_skipped, state,
)
from test_prune_exactness import GroupedConvNet
from lightning_intrafusion import ForwardBrokenError, OTConfig, TransportError, UnsupportedModelError, prune
from lightning_intrafusion.calibration import recalibrate_batchnorm
from lightning_intrafusion.models import MLP, MixedOpsNet, SmallMobileNet, SmallResNet, SmallTransformer, SmallVGG
from lightning_intrafusion.surgery import replay_history

X = torch.randn(8, 1, 8, 8)


def _resnet():
    model = SmallResNet(width=8, blocks=(1, 1))
    randomize_batchnorm(model)
    return model


@pytest.mark.parametrize("factory", [_resnet, lambda: SmallVGG(8), MixedOpsNet, MLP, lambda: SmallMobileNet(se=True)])
def test_pruned_model_is_consistent_and_runs_in_both_modes(factory):
    model = factory()
    out_shape = model(X).shape
    report = prune(model, X, 0.3)
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.device.type == "cpu" and torch.isfinite(p).all()
    model.train()
    loss = model(X).sum()
    loss.backward()  # still trainable
    model.eval()
    assert model(X).shape == out_shape
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    assert 0.2 < report.achieved_sparsity < 0.4
    # widths are rounded to whole GroupNorm groups (4 in MixedOpsNet)
    assert all(abs(g.width_after - 0.7 * g.width_before) <= 2 for g in report.groups)


def test_output_layer_is_protected_automatically():
    model = MLP()
    report = prune(model, X, 0.5)
    assert model.head.out_features == 10
    assert "head" in report.skipped


def test_determinism_bit_identical():
    base = _resnet()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    prune(a, X, 0.5, ot_config=OTConfig(formulation="balanced"))
    prune(b, X, 0.5, ot_config=OTConfig(formulation="balanced"))
    assert_same_state(state(a), state(b))


def test_dict_inputs():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP()

        def forward(self, pixels, scale):
            return self.mlp(pixels) * scale

    model = DictModel()
    report = prune(model, {"pixels": X, "scale": torch.tensor(2.0)}, 0.5)
    assert model.mlp.body[0].out_features == 64 and report.params_after < report.params_before


def test_include_and_exclude_globs():
    model = SmallTransformer(dim=32, heads=4, mlp=64)
    prune(model, X, 0.5, include=["*.fc1"], exclude=["blocks.1.*"])
    assert model.blocks[0].fc1.out_features == 32
    assert model.blocks[1].fc1.out_features == 64
    assert model.blocks[0].attn.q.out_features == 32


def test_attention_heads_removed_whole():
    model = SmallTransformer(dim=32, heads=4, mlp=64)
    prune(model, X, 0.5, include=["*.attn.q"], channel_blocks={"*.attn.q": 8})
    attn = model.blocks[0].attn
    assert attn.q.out_features == attn.k.out_features == attn.v.out_features == attn.o.in_features == 16
    assert model(X).shape == (8, 10)


def test_heads_are_merged_only_when_near_duplicates():
    """Distinct heads are dropped (an averaged head computes neither attention pattern); with
    head_max_cost=None they are merged like channels."""
    torch.manual_seed(0)
    model = SmallTransformer(dim=32, heads=4, mlp=64)
    kwargs = dict(include=["*.attn.q"], channel_blocks={"*.attn.q": 8})
    strict = prune(copy.deepcopy(model), X, 0.5, **kwargs)
    loose = prune(copy.deepcopy(model), X, 0.5, ot_config=OTConfig(head_max_cost=None, formulation="balanced"), **kwargs)
    assert [g.merged for g in strict.groups] == [0, 0]
    assert all(g.merged == 16 for g in loose.groups)  # every removed channel of the two removed heads


def test_depthwise_chains_are_merged_only_when_near_duplicates_if_batchnorm_is_re_estimated():
    """In a step whose BN statistics are re-estimated, channels computed by expansion -> depthwise convs are
    dropped unless a near-duplicate is kept, and residual-stream channels of the same net are merged as usual;
    depthwise_max_cost=None merges all; a data-free step merges them like any channels."""
    torch.manual_seed(0)
    model = SmallMobileNet(width=8).eval()
    recalibrated = dict(calibration_data=[X], compensation="none")
    strict = prune(copy.deepcopy(model), X, 0.5, **recalibrated)
    loose = prune(copy.deepcopy(model), X, 0.5, ot_config=OTConfig(depthwise_max_cost=None), **recalibrated)
    data_free = prune(copy.deepcopy(model), X, 0.5)
    depthwise = {g.name for g in strict.groups if g.name.endswith("block.3")}
    assert len(depthwise) == 3
    assert all(g.merged == 0 for g in strict.groups if g.name in depthwise)
    assert all(g.merged > 0 for g in strict.groups if g.name not in depthwise)
    assert all(g.merged > 0 for g in loose.groups if g.name in depthwise)
    assert all(g.merged > 0 for g in data_free.groups if g.name in depthwise)


def test_groups_without_batchnorm_merge_only_correlated_channels():
    """Hidden neurons with orthonormal input rows and output columns are all sqrt(2) apart: none is
    merged under the absolute threshold for BN-free groups, all are without it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    for layer in (model[1], model[3]):
        nn.init.orthogonal_(layer.weight)
    strict = prune(copy.deepcopy(model), X, 0.5, include=["1"])
    loose = prune(copy.deepcopy(model), X, 0.5, include=["1"], ot_config=OTConfig(max_cost_without_bn=None, max_cost=1.5))
    assert [g.merged for g in strict.groups] == [0]
    assert [g.merged for g in loose.groups] == [8]


def test_groups_without_batchnorm_merge_neurons_within_the_default_distance():
    """Neuron 2m+1 is neuron 2m plus an orthogonal part (cosine 0.2: distance 1.26 between normalised
    features): merged under the default max_cost_without_bn=1.3, dropped under 1.2."""
    torch.manual_seed(0)
    model = MLP(d_in=64, hidden=(32,)).eval()
    odd_rows_at_cosine(model.body[0], 0.2)
    merged = {c: prune(copy.deepcopy(model), X, 0.5, importance=EvenUnitsFirst(),
                       ot_config=OTConfig(max_cost_without_bn=c)).groups[0].merged for c in (1.2, 1.3)}
    assert OTConfig().max_cost_without_bn == 1.3
    assert merged == {1.2: 0, 1.3: 16}


def test_calibration_reestimates_batchnorm_statistics():
    model = _resnet()
    batches = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    report = prune(model, X, 0.5, calibration_data=batches)
    assert report.calibrated
    reference = copy.deepcopy(model)
    recalibrate_batchnorm(reference, batches)
    assert torch.allclose(model.stem[1].running_mean, reference.stem[1].running_mean)
    assert model.training  # modes restored


@pytest.mark.parametrize("factory", [_resnet, GroupedConvNet, lambda: SmallMobileNet(se=True)])
def test_pruned_state_dict_loads_into_fresh_model_after_replay(factory):
    model = factory()
    first = prune(model, X, 0.3)
    second = prune(model, X, 0.3)
    fresh = factory()
    replay_history(fresh, [first.removals, second.removals])
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    assert torch.equal(model(X), fresh(X))


def test_reference_widths_make_sparsity_cumulative():
    model = MLP()
    first = prune(model, X, 0.25)
    original = {g.name: g.width_before for g in first.groups}
    second = prune(model, X, 0.5, reference_widths=original)
    assert {g.name: g.width_after for g in second.groups} == {"body.0": 64, "body.2": 32}


def test_taylor_importance_uses_gradients():
    model = MLP()
    target = torch.randint(0, 10, (8,))
    report = prune(model, X, 0.5, importance="taylor",
                   gradient_fn=lambda m: nn.functional.cross_entropy(m(X), target))
    assert report.params_after < report.params_before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": -0.1}, "sparsity"),
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": "0.5"}, "sparsity"),
    ({"sparsity": 0.5, "method": "magic"}, "method"),
    ({"sparsity": 0.5, "importance": "hessian-ish"}, "importance"),
    ({"sparsity": 0.5, "include": ["no.such.layer*"]}, "matched no"),
    ({"sparsity": 0.5, "exclude": ["nothing"]}, "matched no"),
    ({"sparsity": 0.5, "importance": "taylor"}, "gradient_fn"),
])
def test_bad_arguments_raise_clear_errors_and_leave_model_untouched(kwargs, match):
    model = _resnet()
    before = state(model)
    with pytest.raises((ValueError, TypeError), match=match):
        prune(model, X, **kwargs)
    assert_same_state(before, state(model))


def test_inputs_the_model_rejects():
    model = _resnet()
    before = state(model)
    with pytest.raises(ValueError, match="example_inputs"):
        prune(model, torch.randn(2, 3, 8, 8), 0.5)
    assert_same_state(before, state(model))


def test_unknown_solver_name_rejected_by_config():
    with pytest.raises(ValueError, match="solver"):
        OTConfig(solver="hungarian")


@pytest.mark.parametrize("layer, match", [
    (nn.ConvTranspose2d(8, 8, 3, padding=1, groups=2), "grouped transposed convolution"),
    (nn.InstanceNorm2d(8, track_running_stats=True), "instance norm with running statistics"),
])
def test_unsupported_layers_refused_before_touching_the_model(layer, match):
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), layer, nn.ReLU(), nn.Conv2d(8, 4, 1))
    before = state(model)
    with pytest.raises(UnsupportedModelError, match=match):
        prune(model, X, 0.5)
    assert_same_state(before, state(model))
    prune(model, X, 0.5, exclude=["2"])  # leaving the grouped conv out works


def test_channel_shuffle_is_refused_before_touching_the_model():
    model = ChannelShuffleNet()
    before = state(model)
    with pytest.raises(UnsupportedModelError, match="channel shuffle"):
        prune(model, X, 0.5)
    assert_same_state(before, state(model))
    prune(model, X, 0.5, exclude=["c1"])  # the group after the shuffle is fine


def test_unsupported_groups_can_be_skipped_and_are_reported():
    model = ChannelShuffleNet()
    with pytest.warns(UserWarning, match=r"left 1 channel group\(s\) unpruned: 'c1' \(its channels are reshaped.*channel shuffle"):
        report = prune(model, X, 0.5, on_unsupported="skip")
    assert report.unsupported == {"c1": report.skipped["c1"]} and "channel shuffle" in report.skipped["c1"]
    assert [(g.name, g.width_after) for g in report.groups] == [("c2", 4)]
    assert model.c1.out_channels == 8 and model.c2.out_channels == 4 and model.fc.in_features == 4
    assert model(X).shape == (len(X), 10)
    assert "1 unsupported groups left unpruned" in str(report)


def test_skipping_finds_the_groups_that_break_the_forward():
    """The reshape to the input's width ties the embedding width to the heads, which the graph cannot
    see; with on_unsupported="skip" each group is tried alone, that one is left whole, the MLP is pruned."""
    model = PackedQKVNet()
    with pytest.warns(UserWarning, match="left 2 channel group"):
        report = prune(model, X, 0.5, on_unsupported="skip")
    assert [(g.name, g.width_after) for g in report.groups] == [("fc1", 32)]
    assert sorted(report.unsupported) == ["fc2", "qkv"]  # the embedding width's group is named after fc2
    assert "pruning it breaks the model's forward (RuntimeError: " in report.unsupported["fc2"]
    assert model.embed.out_features == 32 and model.qkv.out_features == 96 and model(X).shape == (len(X), 10)


def test_unknown_on_unsupported_is_rejected_before_touching_the_model():
    model = ChannelShuffleNet()
    before = state(model)
    with pytest.raises(ValueError, match="on_unsupported must be 'raise' or 'skip', got 'ignore'"):
        prune(model, X, 0.5, on_unsupported="ignore")
    assert_same_state(before, state(model))


class TiedEmbeddings(nn.Module):
    """A language-model head that shares its weight with the input embedding."""

    def __init__(self, vocab: int = 20, dim: int = 16) -> None:
        super().__init__()
        self.embed, self.fc1, self.fc2 = nn.Embedding(vocab, dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.decoder = nn.Linear(dim, vocab, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        return self.decoder(h + self.fc2(torch.relu(self.fc1(h))))


@torch.no_grad()
def test_a_tied_width_is_pruned_once_for_both_layers_and_stays_tied():
    """Hidden channels 1, 3, ... silenced (embedding columns, which the decoder shares, and fc2's rows): plain
    pruning removes exactly those once, for the embedding and the decoder alike, and the outputs are unchanged."""
    torch.manual_seed(0)
    model = TiedEmbeddings()
    model.embed.weight[:, 1::2] = 0
    model.fc2.weight[1::2] = 0
    model.fc2.bias[1::2] = 0
    ids = torch.randint(0, 20, (4, 6))
    expected = model(ids)
    report = prune(model, ids, 0.5, method="default", importance="l2", include=["embed"])
    assert [(g.name, g.width_after) for g in report.groups] == [("embed", 8)]
    assert model.decoder.weight is model.embed.weight and model.embed.weight.shape == (20, 8)
    assert sum(p.numel() for p in model.parameters()) == report.params_after
    assert torch.allclose(model(ids), expected, atol=1e-6)


@torch.no_grad()
def test_fusion_of_a_tied_width_merges_every_tensor_but_the_shared_one():
    """Hidden channel 2m+1 a twin of 2m (the shared embedding's column and fc2's row). Fusion merges twins in
    every tensor of the group but the shared one, whose kept columns stay as they were: the MLP sees exactly
    what it saw, and the decoder, which now reads each pair once, gives exactly half the logits (plain
    pruning: not even that)."""
    torch.manual_seed(0)
    model = TiedEmbeddings()
    ids = torch.randint(0, 20, (4, 6))
    duplicate_odd_units(model, ids, include=["embed"])
    expected = model(ids)
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    report = prune(fused, ids, 0.5, include=["embed"], importance=EvenUnitsFirst(), ot_config=OTConfig(features="producer"))
    prune(plain, ids, 0.5, include=["embed"], importance=EvenUnitsFirst(), method="default")
    assert [(g.name, g.width_after, g.merged) for g in report.groups] == [("embed", 8, 8)]
    assert fused.decoder.weight is fused.embed.weight and torch.equal(fused.embed.weight, model.embed.weight[:, 0::2])
    assert torch.allclose(fused(ids), expected / 2, atol=1e-5)
    assert (plain(ids) - expected / 2).abs().max() > 1e-2


class TiedEmbeddingsNormed(TiedEmbeddings):
    """The same with a LayerNorm before the decoder; ``reuse``: the same LayerNorm also normalises the embeddings."""

    def __init__(self, reuse: bool) -> None:
        super().__init__()
        self.norm, self.reuse = nn.LayerNorm(16), reuse

    def forward(self, ids):
        h = self.embed(ids)
        h = self.norm(h) if self.reuse else h
        return self.decoder(self.norm(h + self.fc2(torch.relu(self.fc1(h)))))


@torch.no_grad()
@pytest.mark.parametrize("reuse", [False, True])
def test_a_norm_feeding_only_the_tied_decoder_makes_up_for_its_unmerged_columns(reuse):
    """Twinned hidden channels: the LayerNorm before the decoder doubles its kept channels, so the logits are kept
    exactly; a LayerNorm that is called twice (once on the embeddings too) is left alone: half the logits."""
    torch.manual_seed(0)
    model = TiedEmbeddingsNormed(reuse)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    ids = torch.randint(0, 20, (4, 6))
    duplicate_odd_units(model, ids, include=["embed"])
    expected = model(ids)
    report = prune(model, ids, 0.5, include=["embed"], importance=EvenUnitsFirst(), ot_config=OTConfig(features="producer"))
    assert [(g.width_after, g.merged) for g in report.groups] == [(8, 8)]  # one group, named after fc2 or embed
    assert torch.allclose(model(ids), expected / 2 if reuse else expected, atol=1e-5)


@pytest.mark.parametrize("compensation", ["linear", "refit"])
def test_repairs_with_data_leave_a_tied_weight_alone(compensation):
    """Linear compensation and the refit would rewrite the decoder's columns, which are the embedding's: the
    tied weight keeps its kept columns as they were, and stays tied."""
    torch.manual_seed(0)
    model = TiedEmbeddings()
    ids = torch.randint(0, 20, (4, 6))
    batches = [torch.randint(0, 20, (8, 6), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    before = model.embed.weight.detach().clone()
    report = prune(model, ids, 0.5, include=["embed"], calibration_data=batches, compensation=compensation)
    kept = [c for c in range(16) if c not in next(idx for name, side, idx in report.removals if name == "embed")]
    assert model.decoder.weight is model.embed.weight and torch.equal(model.embed.weight.detach(), before[:, kept])


class TiedEmbeddingsReshaped(TiedEmbeddings):
    """The same, reshaping the hidden width to a fixed 4 x 4 before the decoder (the graph cannot see it)."""

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.decoder(h.reshape(*h.shape[:-1], 4, 4).flatten(-2))


def test_a_step_rolled_back_after_pruning_a_tied_width_leaves_it_tied():
    model = TiedEmbeddingsReshaped()
    ids = torch.randint(0, 20, (4, 6))
    shared = model.embed.weight
    report = refused_untouched_then_skipped(model, ids, ForwardBrokenError, "channel group of 'embed' pruned on its own",
                                            "breaks the model's forward")
    assert model.embed.weight is shared and model.decoder.weight is shared  # the very same parameter, still tied
    assert [g.name for g in report.groups] == ["fc1"] and model(ids).shape == (4, 6, 20)


class TiedAcrossDense(nn.Module):
    """A masked-LM head: the stream goes through a dense layer into a decoder that shares the input embedding,
    so the stream's width and the dense layer's are coupled by one tensor."""

    def __init__(self, vocab: int = 20, dim: int = 16) -> None:
        super().__init__()
        self.embed, self.fc1, self.fc2 = nn.Embedding(vocab, dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.transform, self.decoder = nn.Linear(dim, dim), nn.Linear(dim, vocab, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.decoder(torch.relu(self.transform(h)))


@torch.no_grad()
def test_widths_coupled_by_a_tied_weight_are_pruned_as_one_group():
    """Channels 1, 3, ... silenced in both widths (the shared embedding's columns, fc2's and the transform's rows,
    their consumers' columns): the two widths are one group, which loses exactly those channels in both, and the
    outputs are unchanged."""
    torch.manual_seed(0)
    model = TiedAcrossDense()
    for weight in (model.embed.weight, model.fc1.weight, model.transform.weight):
        weight[:, 1::2] = 0  # the embedding (and decoder) columns; the stream's consumers
    for layer in (model.fc2, model.transform):
        layer.weight[1::2] = 0
        layer.bias[1::2] = 0
    ids = torch.randint(0, 20, (4, 6))
    expected = model(ids)
    report = prune(model, ids, 0.5, method="default", importance="l2", include=["embed"])
    assert [(g.width_before, g.width_after) for g in report.groups] == [(16, 8)]
    assert {"embed", "transform", "decoder"} <= set(report.groups[0].members)
    assert model.decoder.weight is model.embed.weight and model.transform.weight.shape == (8, 8)
    assert torch.allclose(model(ids), expected, atol=1e-6)


class SquareTied(nn.Module):
    """Two square layers sharing one weight, one after the other: the hidden channels are its rows in the
    first and its columns in the second."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc1, self.fc2, self.head = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 10)
        self.fc2.weight = self.fc1.weight

    def forward(self, x):
        return self.head(self.fc2(torch.relu(self.fc1(self.embed(x.flatten(1))))))


def test_a_tied_weight_seen_along_two_dimensions_is_refused_and_stays_tied():
    model = SquareTied()
    report = refused_untouched_then_skipped(model, X, UnsupportedModelError,
                                            r"fc1.weight = fc2.weight, one shared \(tied\) parameter", "left 3 channel group")
    assert not report.groups and model.fc2.weight is model.fc1.weight and model.fc1.weight.shape == (16, 16)


class PackedQKVNet(nn.Module):
    """timm-style attention: one qkv linear, reshaped to a fixed number of heads of size C // heads,
    and an MLP."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(8, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x.reshape(-1, 8, 8))
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        t = t + self.proj(a)
        return self.head((t + self.fc2(torch.relu(self.fc1(t)))).mean(1))


def test_packed_qkv_heads_are_refused_and_a_hidden_width_dependency_rolls_back():
    model = PackedQKVNet()
    before = state(model)
    with pytest.raises(UnsupportedModelError, match="qkv"):
        prune(model, X, 0.5)
    with pytest.raises(RuntimeError, match="no longer runs.*rolled back"):
        prune(model, X, 0.5, include=["embed"])  # the reshape ties the heads to the embedding width
    assert_same_state(before, state(model))


def test_the_error_names_the_group_that_breaks_the_forward():
    """Of the two groups asked for, the embedding width breaks the forward (the reshape ties it to the heads)
    and the MLP neurons do not: the error names the first, found by pruning each on its own, and the model
    is left as it was."""
    model = PackedQKVNet()
    before = state(model)
    with pytest.raises(ForwardBrokenError, match="with the channel group of .* pruned on its own, the pruned model "
                                                 "no longer runs") as err:
        prune(model, X, 0.5, include=["embed", "fc1"])
    assert_same_state(before, state(model))
    with pytest.warns(UserWarning, match="breaks the model's forward"):
        report = prune(model, X, 0.5, include=["embed", "fc1"], on_unsupported="skip")
    [breaking] = report.unsupported  # the embedding width's group, whichever layer Torch-Pruning roots it at
    assert [g.name for g in report.groups] == ["fc1"] and model.embed.out_features == 32
    assert f"channel group of {breaking!r} pruned" in str(err.value) and "'fc1'" not in str(err.value)


class ReturnsItsStream(nn.Module):
    """Returns the residual stream next to the logits (like a Hugging Face model's last_hidden_state): its
    width is an output without any layer producing it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc1, self.fc2, self.head = nn.Linear(64, 16), nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 10)

    def forward(self, x):
        stream = self.embed(x.flatten(1))
        stream = stream + self.fc2(torch.relu(self.fc1(stream)))
        return self.head(stream), stream


def test_a_width_returned_without_a_layer_is_found_by_the_output_check():
    model = ReturnsItsStream()
    report = refused_untouched_then_skipped(
        model, X, ForwardBrokenError, r"output shapes change from \[\(8, 10\), \(8, 16\)\] to \[\(8, 10\), \(8, 8\)\]",
        "output shapes change")
    assert [g.name for g in report.groups] == ["fc1"] and [tuple(t.shape) for t in model(X)] == [(8, 10), (8, 16)]


class ExplicitMatmulAttention(nn.Module):
    """Attention written out with ``@`` (no scaled_dot_product_attention): 4 heads of 8."""

    def __init__(self, dim: int = 32, head_dim: int = 8) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.embed, self.head = nn.Linear(8, dim), nn.Linear(dim, 10)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        t = self.embed(x.reshape(-1, 8, 8))
        b, n, _ = t.shape

        def split(y):
            return y.reshape(b, n, -1, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(t)), split(self.k(t)), split(self.v(t))
        a = ((q @ k.transpose(-2, -1)) / self.head_dim ** 0.5).softmax(-1) @ v
        return self.head((t + self.o(a.transpose(1, 2).reshape(b, n, -1))).mean(1))


def test_heads_of_explicit_matmul_attention_need_their_size():
    model = ExplicitMatmulAttention()
    before = state(model)
    with pytest.raises(UnsupportedModelError, match=r"matrix product of activations.*channel_blocks=\{'[qkv]': head_dim\}"):
        prune(model, X, 0.5)
    assert_same_state(before, state(model))
    report = prune(model, X, 0.5, channel_blocks={"q": 8})
    removed = next(idx for name, side, idx in report.removals if name == "q" and side == "out")
    heads = {i // 8 for i in removed}
    assert len(heads) == 2 and set(removed) == {8 * h + j for h in heads for j in range(8)}  # two whole heads
    assert model(X).shape == (8, 10)


@torch.no_grad()
def test_heads_of_explicit_matmul_attention_that_declares_them_are_found():
    """BERT-style attention written out with ``@`` that declares its heads (``num_attention_heads`` x
    ``head_size``, multiplying to the projection width) and reshapes with the count: heads 1 and 3, silenced,
    are removed whole, the count follows, and the outputs are unchanged."""
    torch.manual_seed(0)
    model = HeadCountNet(count_attribute="num_attention_heads", explicit=True)
    attn = model.attn
    for h in (1, 3):
        for layer in (attn.q_proj, attn.k_proj, attn.v_proj):
            layer.weight[4 * h:4 * h + 4] = 0
            layer.bias[4 * h:4 * h + 4] = 0
        attn.out_proj.weight[:, 4 * h:4 * h + 4] = 0
    expected = model(X)
    report = prune(model, X, 0.5, method="default", importance="l2", include=["attn.q_proj"])
    assert [(g.width_before, g.width_after) for g in report.groups] == [(16, 8)]
    assert next(idx for name, side, idx in report.removals if name == "attn.q_proj" and side == "out") == [*range(4, 8), *range(12, 16)]
    assert attn.num_attention_heads == 2 and attn.q_proj.out_features == attn.k_proj.out_features == attn.v_proj.out_features == 8
    assert torch.allclose(model(X), expected, atol=1e-6)


def test_declared_heads_that_do_not_make_up_the_width_are_not_trusted():
    model = HeadCountNet(count_attribute="num_attention_heads", explicit=True)
    model.attn.head_size = 2  # 4 declared heads of 2 are not its 16 channels: not trusted
    with pytest.raises(UnsupportedModelError, match="matrix product of activations"):
        prune(model, X, 0.5)


def test_solver_hitting_its_iteration_cap_is_detected_and_rolled_back():
    model = _resnet()
    before = state(model)
    with pytest.raises(TransportError, match="num_iter_max"):
        prune(model, X, 0.5, ot_config=OTConfig(formulation="balanced", num_iter_max=2))
    assert_same_state(before, state(model))


def test_failure_in_the_middle_of_a_step_restores_everything():
    calls = []
    from lightning_intrafusion.importance import resolve_importance
    l1 = resolve_importance("l1")

    def flaky(group):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in group 3")
        return l1(group)

    model = _resnet()
    before = state(model)
    with pytest.raises(RuntimeError, match="boom"):
        prune(model, X, 0.5, importance=flaky)
    assert len(calls) == 3
    assert_same_state(before, state(model))
    prune(model, X, 0.5)  # the restored model prunes normally


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_is_kept(dtype):
    model = _resnet().to(dtype)
    x = X.to(dtype)
    prune(model, x, 0.5)
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(b.dtype == dtype for n, b in model.named_buffers() if "num_batches" not in n)
    model.eval()
    assert model(x).dtype == dtype and torch.isfinite(model(x).float()).all()


def test_sinkhorn_solver_prunes():
    model = _resnet()
    report = prune(model, X, 0.5, ot_config=OTConfig(solver="sinkhorn"))
    assert report.params_after < report.params_before
    model.eval()
    assert torch.isfinite(model(X)).all()


@pytest.mark.parametrize("compensation, expected", [("mean", "sinkhorn"), ("none", "sinkhorn"), ("linear", "emd")])
def test_re_estimated_statistics_take_sinkhorn_plans_unless_removed_channels_are_regressed(compensation, expected):
    """solver="auto": Sinkhorn where BN statistics are re-estimated, exact OT where the merges are limited to
    near-duplicates because linear compensation predicts the rest."""
    batches = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    config = {"auto": None, "sinkhorn": OTConfig(solver="sinkhorn"), "emd": OTConfig(solver="emd")}
    if compensation == "linear":  # a threshold at which these random channels merge, so the two solvers differ
        config = {k: replace(c or OTConfig(), max_cost_regressed=1.3) for k, c in config.items()}
    pruned = {}
    for label, ot_config in config.items():
        torch.manual_seed(0)
        pruned[label] = _resnet()
        prune(pruned[label], X, 0.5, ot_config=ot_config, calibration_data=batches, compensation=compensation)
    other = "emd" if expected == "sinkhorn" else "sinkhorn"
    assert_same_state(state(pruned["auto"]), state(pruned[expected]))
    assert any(not torch.equal(a, b) for a, b in zip(state(pruned["auto"]).values(), state(pruned[other]).values()))


def test_prune_checkpoint_one_shot_and_restore(tmp_path):
    from lightning_intrafusion import prune_checkpoint, restore_pruned

    model = _resnet()
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "dense.ckpt")
    pruned = SmallResNet(width=8, blocks=(1, 1))
    report = prune_checkpoint(pruned, str(tmp_path / "dense.ckpt"), X, 0.3, output=str(tmp_path / "p1.ckpt"))
    again = SmallResNet(width=8, blocks=(1, 1))
    prune_checkpoint(again, str(tmp_path / "p1.ckpt"), X, 0.3, output=str(tmp_path / "p2.ckpt"))  # history accumulates
    assert report.params_after < report.params_before
    first, second = restore_pruned(SmallResNet(width=8, blocks=(1, 1)), str(tmp_path / "p1.ckpt")), \
        restore_pruned(SmallResNet(width=8, blocks=(1, 1)), str(tmp_path / "p2.ckpt"))
    for m in (pruned, again, first, second):
        m.eval()
    assert torch.equal(first(X), pruned(X)) and torch.equal(second(X), again(X))
    assert sum(p.numel() for p in second.parameters()) < sum(p.numel() for p in first.parameters())
    assert torch.load(tmp_path / "p2.ckpt", weights_only=True)["epoch"] == 3


def test_compiled_models_are_pruned_like_uncompiled_ones():
    """torch.compile'd model or submodule: the same channels go, MACs are counted, names are the
    uncompiled model's (so its history replays on a fresh model), and the compiled wrappers stay."""
    torch.manual_seed(0)
    reference = SmallVGG(8).eval()
    whole, part = copy.deepcopy(reference), copy.deepcopy(reference)
    expected = prune(reference, X, 0.5)
    whole = torch.compile(whole, backend="eager")
    part.features = torch.compile(part.features, backend="eager")
    for model in (whole, part):
        model(X)  # compiled for the unpruned shapes
        report = prune(model, X, 0.5)
        assert (report.params_after, report.macs_before, report.macs_after) == (
            expected.params_after, expected.macs_before, expected.macs_after)
        assert [g.name for g in report.groups] == [g.name for g in expected.groups]
        assert torch.equal(model(X), reference(X))  # recompiled for the new shapes
    assert type(part.features).__name__ == "OptimizedModule"
    fresh = SmallVGG(8)
    replay_history(fresh, [report.removals])
    fresh.load_state_dict(reference.state_dict())


def test_frozen_layers_are_pruned_and_stay_frozen():
    """requires_grad=False hides a layer from autograd, which the dependency graph is read from: frozen
    layers must be pruned like the others, and stay frozen."""
    torch.manual_seed(0)
    reference = SmallVGG(8).eval()
    frozen = copy.deepcopy(reference)
    for p in frozen.features.parameters():
        p.requires_grad_(False)
    expected = prune(reference, X, 0.5)
    report = prune(frozen, X, 0.5)
    assert report.params_after == expected.params_after
    assert torch.equal(frozen(X), reference(X))
    assert not any(p.requires_grad for p in frozen.features.parameters())
    assert all(p.requires_grad for p in frozen.classifier.parameters())


def test_a_group_torch_pruning_cannot_resolve_is_refused_instead_of_hanging(monkeypatch):
    """Torch-Pruning's search never ends on some graphs (a tiny Hugging Face LLaMA with rotary embeddings
    hangs it); such a group is reported as unsupported after a time limit, and the others prune."""
    import time

    import lightning_intrafusion.graph as graph_module

    monkeypatch.setattr(graph_module, "GROUP_SECONDS", 0.2)
    original = torch_pruning.DependencyGraph.get_pruning_group

    def endless_for_fc1(self, module, fn, idxs):
        if module is self.model[1]:
            while True:
                time.sleep(0.01)
        return original(self, module, fn, idxs)

    monkeypatch.setattr(torch_pruning.DependencyGraph, "get_pruning_group", endless_for_fc1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    before = state(model)
    with pytest.raises(UnsupportedModelError, match="could not resolve its dependencies within 0.2 s"):
        prune(model, X, 0.5)
    assert_same_state(before, state(model))
    report = prune(model, X, 0.5, exclude=["1"])
    assert [(g.name, g.width_after) for g in report.groups] == [("3", 8)]


def test_a_group_torch_pruning_fails_on_is_refused_with_its_error(monkeypatch):
    """Torch-Pruning's index mappings can fail on graphs they do not expect (a Hugging Face Hiera's
    attention: ZeroDivisionError inside its repeat mapping); that group is refused with the error named,
    the model untouched, and ``"skip"`` prunes the others."""
    original = torch_pruning.DependencyGraph.get_pruning_group

    def failing_for_fc1(self, module, fn, idxs):
        if module is self.model[1]:
            raise ZeroDivisionError("integer division or modulo by zero")
        return original(self, module, fn, idxs)

    monkeypatch.setattr(torch_pruning.DependencyGraph, "get_pruning_group", failing_for_fc1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    report = refused_untouched_then_skipped(
        model, X, UnsupportedModelError, r"'1': Torch-Pruning failed to resolve its dependencies \(ZeroDivisionError: "
        "integer division", "left 1 channel group")
    assert [(g.name, g.width_after) for g in report.groups] == [("3", 8)] and model[1].out_features == 16


def test_a_group_that_timed_out_is_not_waited_for_again_in_the_next_block(monkeypatch):
    """After blocks.N.fc1 timed out, the fc1 of every other block (same type, same place) is refused at
    once: a deep model would otherwise wait the time limit once per block."""
    import time

    import lightning_intrafusion.graph as graph_module

    monkeypatch.setattr(graph_module, "GROUP_SECONDS", 0.2)
    original = torch_pruning.DependencyGraph.get_pruning_group
    waited = []

    def endless_for_fc1(self, module, fn, idxs):
        if module in fc1s:
            waited.append(module)
            while True:
                time.sleep(0.01)
        return original(self, module, fn, idxs)

    monkeypatch.setattr(torch_pruning.DependencyGraph, "get_pruning_group", endless_for_fc1)
    model = SmallTransformer(dim=32, heads=4, mlp=64)
    fc1s = [block.fc1 for block in model.blocks]
    with pytest.warns(UserWarning, match="left 2 channel group"):
        report = prune(model, X, 0.5, on_unsupported="skip", channel_blocks={"*.attn.q": 8})
    assert len(waited) == 1
    first = "blocks.0.fc1" if waited[0] is fc1s[0] else "blocks.1.fc1"
    other = ({"blocks.0.fc1", "blocks.1.fc1"} - {first}).pop()
    assert "could not resolve its dependencies within 0.2 s" in report.unsupported[first]
    assert (f"could not resolve the dependencies of '{first}' within 0.2 s, and this layer has the same place in "
            "another repeated block") in report.unsupported[other]
    assert all(block.fc1.out_features == 64 for block in model.blocks) and model(X).shape == (len(X), 10)


def test_a_group_that_timed_out_is_not_waited_for_again_while_skipping(monkeypatch):
    """Finding the groups that break the forward re-reads the model's groups once per group tried; a group
    that timed out once is refused at once from then on (FocalNet: 110 s -> 20 s)."""
    import time

    import lightning_intrafusion.graph as graph_module

    monkeypatch.setattr(graph_module, "GROUP_SECONDS", 0.2)
    original = torch_pruning.DependencyGraph.get_pruning_group
    waited = []

    def endless_for_fc1(self, module, fn, idxs):
        if module is self.model.fc1:
            waited.append(module)
            while True:
                time.sleep(0.01)
        return original(self, module, fn, idxs)

    monkeypatch.setattr(torch_pruning.DependencyGraph, "get_pruning_group", endless_for_fc1)
    model = ReturnsItsStream()  # its stream's width changes an output: every other group is tried on its own
    with pytest.warns(UserWarning, match="left 2 channel group"):
        report = prune(model, X, 0.5, on_unsupported="skip")
    assert len(waited) == 1 and "within 0.2 s" in report.unsupported["fc1"] and not report.groups


def test_verbose_prints_progress_and_silence_is_the_default(capsys):
    prune(SmallResNet(width=8), X, 0.5)
    assert capsys.readouterr().out == ""
    report = prune(SmallResNet(width=8), X, 0.5, verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[prune] tracing the model and building its dependency graph"
    groups = [line for line in lines if line.startswith("[prune] group ")]
    assert len(groups) == len(report.groups) and groups[0].startswith(f"[prune] group 1/{len(report.groups)} ")
    assert " -> " in groups[0] and " merged (" in groups[0]
    assert lines[-1] == f"[prune] {report}"

