"""A Hugging Face GPT-2 (built from a small config, nothing downloaded): its layers are ``Conv1D``
(weight stored as (in, out)), its attention packs query/key/value in one layer, and its output layer
is tied to the input embedding."""

import copy

import pytest
import torch

from helpers import (
    EvenUnitsFirst, assert_only_fusion_keeps_the_outputs, assert_reloads, duplicate_odd_units,
    fuse_and_prune_plainly, prune_with_mirrored_momentum,
)
from lightning_intrafusion import prune

transformers = pytest.importorskip("transformers")

MLP = ["*.mlp.c_fc"]


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 50, (2, 8)), "use_cache": False}
    return model, inputs


def test_mlp_neurons_of_conv1d_layers_are_fused_exactly():
    model, inputs = _gpt2()
    duplicate_odd_units(model, inputs, include=MLP)
    fused, plain, report, expected = fuse_and_prune_plainly(model, inputs, 0.5, importance=EvenUnitsFirst(), include=MLP)
    assert [(g.width_before, g.width_after, g.merged) for g in report.groups] == [(128, 64, 64)] * 2
    assert fused.transformer.h[0].mlp.c_fc.weight.shape == (32, 64)  # (in, out)
    assert fused.transformer.h[0].mlp.c_proj.weight.shape == (64, 32)
    assert report.macs_after < report.macs_before
    assert_only_fusion_keeps_the_outputs(fused, plain, inputs, expected, atol=1e-4)
    assert_reloads(fused, _gpt2()[0], report, inputs)


@pytest.mark.parametrize("include", [MLP, ["*.attn.c_attn", *MLP]], ids=["mlp", "heads and mlp"])
def test_optimizer_state_of_conv1d_layers_is_sliced_like_the_weights(include):
    """Momentum equal to the weights before pruning equals them after: sliced exactly like them (Conv1D
    weights are (in, out); packed heads lose columns in each of c_attn's three sections)."""
    model, inputs = _gpt2()
    report = prune_with_mirrored_momentum(model, lambda m: prune(m, inputs, 0.5, include=include, method="default"))
    assert len(report.groups) == 2 * len(include)


def _duplicate_odd_heads(model) -> None:
    """Head 2m+1 of every packed c_attn computes what head 2m computes (its query, key and value columns
    copied); its c_proj rows are halved so that magnitude importance keeps the even heads."""
    with torch.no_grad():
        for block in model.transformer.h:
            attn = block.attn
            width, d = attn.split_size, attn.head_dim
            for head in range(1, attn.num_heads, 2):
                for section in range(3):
                    src = slice(section * width + (head - 1) * d, section * width + head * d)
                    dst = slice(section * width + head * d, section * width + (head + 1) * d)
                    attn.c_attn.weight[:, dst] = attn.c_attn.weight[:, src]
                    attn.c_attn.bias[dst] = attn.c_attn.bias[src]
                attn.c_proj.weight[head * d:(head + 1) * d] *= 0.5


def test_heads_of_packed_attention_are_fused_exactly_and_replay():
    model, inputs = _gpt2()
    _duplicate_odd_heads(model)
    fused, plain, report, expected = fuse_and_prune_plainly(model, inputs, 0.5, include=["*.attn.c_attn"])
    assert [(g.name, g.width_before, g.width_after, g.merged) for g in sorted(report.groups, key=lambda g: g.name)] == [
        ("transformer.h.0.attn", 32, 16, 16), ("transformer.h.1.attn", 32, 16, 16)]
    attn = fused.transformer.h[0].attn
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf, attn.c_proj.nx) == (2, 16, 48, 16)
    assert attn.c_attn.weight.shape == (32, 48) and attn.c_proj.weight.shape == (16, 32)
    assert_only_fusion_keeps_the_outputs(fused, plain, inputs, expected, atol=1e-4)
    assert_reloads(fused, _gpt2()[0], report, inputs)


def test_tied_width_is_pruned_once_and_stays_tied():
    """The hidden width lives in the embedding that the output layer shares: its columns go once for both,
    without merging (one tensor cannot be averaged as an embedding and summed as an output layer; the group's
    other tensors are fused, here with nothing close enough to merge), and the pruned model reloads tied."""
    model, inputs = _gpt2()
    report = prune(model, inputs, 0.5)
    assert not report.unsupported
    hidden = {g.name: g for g in report.groups}["transformer.h.1.mlp.c_proj"]
    assert (hidden.width_before, hidden.width_after, hidden.merged) == (32, 16, 0)
    assert model.lm_head.weight is model.transformer.wte.weight and model.transformer.wte.weight.shape == (50, 16)
    assert sum(p.numel() for p in model.parameters()) == report.params_after
    with torch.no_grad():
        assert model(**inputs).logits.shape == (2, 8, 50)
    fresh = _gpt2()[0]
    assert_reloads(model, fresh, report, inputs)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    with pytest.raises(ValueError, match="use_cache=False"):
        prune(model, {"input_ids": inputs["input_ids"]}, 0.5, include=MLP)


def test_tied_width_fuses_exactly_through_the_final_layer_norm():
    """Hidden channel 2m+1 a twin of 2m. The shared tensor's columns are removed without merging, and
    ``ln_f``, which feeds the output layer and nothing else, scales its kept channels by what the output
    layer's merged columns would have added (here 2): the logits are kept exactly; plain pruning does not keep them."""
    model, inputs = _gpt2()
    duplicate_odd_units(model, inputs, include=["transformer.h.1.mlp.c_proj"])
    weight, bias = model.transformer.ln_f.weight.detach().clone(), model.transformer.ln_f.bias.detach().clone()
    fused, plain, report, expected = fuse_and_prune_plainly(model, inputs, 0.5, importance=EvenUnitsFirst(),
                                                            include=["transformer.h.1.mlp.c_proj"])
    assert [(g.name, g.width_after, g.merged) for g in report.groups] == [("transformer.h.1.mlp.c_proj", 16, 16)]
    assert fused.lm_head.weight is fused.transformer.wte.weight
    assert torch.allclose(fused.transformer.ln_f.weight, 2 * weight[0::2]) and torch.allclose(fused.transformer.ln_f.bias, 2 * bias[0::2])
    assert_only_fusion_keeps_the_outputs(fused, plain, inputs, expected)


def test_optimizer_state_of_the_tied_width_is_sliced_once():
    model, inputs = _gpt2()
    prune_with_mirrored_momentum(model, lambda m: prune(m, inputs, 0.5, method="default"))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_square_conv1d_pruned_on_both_sides_keeps_matching_optimizer_state():
    """Both sides of a square (in, out) weight lose equally many channels: which dim is which must
    come from the layer, not from the counts."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv1D(16, 8), torch.nn.ReLU(), Conv1D(16, 16), torch.nn.ReLU(), Conv1D(4, 16))
    x = torch.randn(5, 8)
    report = prune_with_mirrored_momentum(model, lambda m: prune(m, x, 0.5, method="default"))
    assert model[2].weight.shape == (8, 8)
    assert (report.macs_before, report.macs_after) == (8 * 16 + 16 * 16 + 16 * 4, 8 * 8 + 8 * 8 + 8 * 4)  # per sample


def _held_out_error(model, inputs, **kwargs):
    batches = [{"input_ids": torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(i)), "use_cache": False}
               for i in range(8)]
    held_out = {"input_ids": torch.randint(0, 50, (16, 8), generator=torch.Generator().manual_seed(99)), "use_cache": False}
    with torch.no_grad():
        expected = model(**held_out).logits
    pruned = copy.deepcopy(model)
    prune(pruned, inputs, 0.5, calibration_data=batches, exclude=["*.wte"], **kwargs)  # heads and MLP neurons
    with torch.no_grad():
        return ((pruned(**held_out).logits - expected).norm() / expected.norm()).item()


def test_compensation_and_refit_serve_conv1d_layers():
    """Conv1D stores its weight as (in, out): linear compensation updates rows of it and the refit solves for it
    directly; both bring the logits on held-out tokens far closer than pruning without them (MLP neurons and
    heads; the packed c_attn, whose removals are recorded per head, is not refit)."""
    model, inputs = _gpt2()
    errors = {c: _held_out_error(model, inputs, compensation=c) for c in ("none", "linear", "refit")}
    assert errors["linear"] < 0.5 * errors["none"] and errors["refit"] < 0.5 * errors["none"], errors
