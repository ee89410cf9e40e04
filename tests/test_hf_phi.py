"""Hugging Face Phi and Phi-3 (built from small configs, nothing downloaded). Phi's attention has separate
q/k/v projections, partial rotary embeddings and an output projection named ``dense``; Phi-3 packs its
MLP's gate and up projections in one layer (``gate_up_proj``, chunked in two in the forward), which the
dependency graph cannot follow, and its query/key/value heads in another (``qkv_proj``, split at a head
count the forward reads from the config that all layers share)."""

import pytest
import torch
from torch import nn

from helpers import (
    assert_only_fusion_keeps_the_outputs, assert_reloads, assert_same_state, duplicate_odd_units,
    fuse_and_prune_plainly, prune_with_mirrored_momentum, rank_odd_units_last, state, twin_odd_heads,
)
from lightning_intrafusion import OTConfig, UnsupportedModelError, prune
from lightning_intrafusion.packed_mlp import is_packed_gated_mlp
from lightning_intrafusion.surgery import replay_history

transformers = pytest.importorskip("transformers")


def _phi3(kv_heads: int = 2, **config):
    torch.manual_seed(0)
    config = transformers.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=kv_heads, vocab_size=50, max_position_embeddings=16,
                                     pad_token_id=0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, **config)
    return transformers.Phi3ForCausalLM(config).eval(), {"input_ids": torch.randint(0, 50, (2, 8)), "use_cache": False}


def _phi():
    torch.manual_seed(0)
    config = transformers.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=50, max_position_embeddings=16, bos_token_id=0, eos_token_id=0)
    return transformers.PhiForCausalLM(config).eval(), {"input_ids": torch.randint(0, 50, (2, 8)), "use_cache": False}


def test_packed_gate_and_up_neurons_fuse_exactly():
    """Neuron 2m+1 (its gate row and its up row) duplicates neuron 2m. Every row and column has unit norm
    but odd neurons' ``down_proj`` columns, halved, so that magnitude keeps the even neurons (custom
    importance objects cannot score groups without a Torch-Pruning group). Fusion keeps the outputs,
    plain pruning of the same neurons does not."""
    model, inputs = _phi3()
    for layer in model.model.layers:
        rank_odd_units_last(layer.mlp.gate_up_proj, layer.mlp.down_proj)
    duplicate_odd_units(model, inputs, include=["*.gate_up_proj"])
    fused, plain, report, expected = fuse_and_prune_plainly(model, inputs, 0.5, importance="l2", include=["*.gate_up_proj"],
                                                            ot_config=OTConfig(features="producer"))
    assert [(g.name, g.width_before, g.width_after, g.merged) for g in report.groups] == [
        (f"model.layers.{i}.mlp.gate_up_proj", 64, 32, 32) for i in range(2)]
    mlp = fused.model.layers[0].mlp
    assert mlp.gate_up_proj.weight.shape == (64, 32) and mlp.down_proj.weight.shape == (32, 32)
    assert_only_fusion_keeps_the_outputs(fused, plain, inputs, expected)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_split_qkv_heads_fuse_exactly_in_units_of_a_key_value_head(kv_heads):
    """Phi-3's ``qkv_proj``: all query heads, then the key heads, then the value heads. Unit 2m+1 (a key/value
    head with its query heads) twins unit 2m; fusion keeps the outputs, plain pruning does not. Each layer
    gets a config of its own whose head counts follow its pruning (the forward splits ``qkv_proj`` at
    ``config.num_attention_heads``); the model's config is left as it was."""
    model, inputs = _phi3(kv_heads, partial_rotary_factor=0.5)
    twin_odd_heads(model, inputs, [layer.self_attn.o_proj for layer in model.model.layers], 8 * 4 // kv_heads, "*.qkv_proj")
    fused, plain, report, expected = fuse_and_prune_plainly(model, inputs, 0.5, include=["*.qkv_proj"],
                                                            ot_config=OTConfig(features="producer"))
    assert [(g.name, g.width_after, g.merged) for g in report.groups] == [
        (f"model.layers.{i}.self_attn.qkv_proj", 16, 16) for i in range(2)]
    attn = fused.model.layers[0].self_attn
    assert attn.qkv_proj.weight.shape == (16 + 2 * 8 * (kv_heads // 2), 32) and attn.o_proj.weight.shape == (32, 16)
    assert (attn.num_key_value_heads, attn.config.num_attention_heads, attn.config.num_key_value_heads) == (
        kv_heads // 2, 2, kv_heads // 2)
    assert fused.config.num_attention_heads == 4 and fused.config.num_key_value_heads == kv_heads
    assert_only_fusion_keeps_the_outputs(fused, plain, inputs, expected)
    assert_reloads(fused, _phi3(kv_heads, partial_rotary_factor=0.5)[0], report, inputs)


def test_one_call_prunes_heads_mlps_and_hidden_width_twice_and_generates():
    """The whole model in one call, then again: the second step reads each layer's own head counts."""
    model, inputs = _phi3(kv_heads=4)
    first = prune(model, inputs, 0.5)
    assert not first.unsupported
    assert {g.name: g.width_after for g in first.groups} == {
        **{f"model.layers.{i}.mlp.gate_up_proj": 32 for i in range(2)},
        **{f"model.layers.{i}.self_attn.qkv_proj": 16 for i in range(2)}, "model.layers.1.mlp.down_proj": 16}
    second = prune(model, inputs, 0.5, include=["*.qkv_proj"])
    attn = model.model.layers[1].self_attn
    assert attn.qkv_proj.weight.shape == (3 * 8, 16) and attn.config.num_attention_heads == attn.num_key_value_heads == 1
    fresh = _phi3(kv_heads=4)[0]
    replay_history(fresh, [first.removals, second.removals])
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(**inputs).logits, model(**inputs).logits)
    prompt = inputs["input_ids"][:1]  # with the key/value cache
    assert torch.equal(model.generate(prompt, max_new_tokens=3, do_sample=False),
                       fresh.generate(prompt, max_new_tokens=3, do_sample=False))


def test_a_failed_step_gives_the_layers_their_shared_config_back(monkeypatch):
    """All or nothing: a step that fails after the removals puts back the one config all layers share."""
    import lightning_intrafusion.pruner as pruner

    model, inputs = _phi3()
    before, config = state(model), model.config

    def fail(*args, **kwargs):
        assert model.model.layers[0].self_attn.config.num_attention_heads == 2  # the removal did happen
        raise RuntimeError("injected failure after the removals")

    monkeypatch.setattr(pruner, "check_still_runs", fail)
    with pytest.raises(RuntimeError, match="injected"):
        prune(model, inputs, 0.5, include=["*.qkv_proj"])
    assert all(layer.self_attn.config is config for layer in model.model.layers)
    assert config.num_attention_heads == 4 and model.model.layers[0].self_attn.num_key_value_heads == 2
    assert_same_state(before, state(model))


def test_optimizer_state_of_packed_neurons_is_sliced_like_the_weights():
    """Momentum equal to the weights before plain pruning equals them after: both halves of
    ``gate_up_proj`` lose the rows of the removed neurons."""
    model, inputs = _phi3()
    prune_with_mirrored_momentum(model, lambda m: prune(m, inputs, 0.5, include=["*.gate_up_proj"], method="default"))
    assert model.model.layers[0].mlp.gate_up_proj.weight.shape == (64, 32)


def test_heads_of_attention_with_a_dense_output_projection_fuse_exactly():
    """Phi: head 2m+1 duplicates head 2m (its output-projection columns halved so that magnitude keeps
    the even heads); partial rotary embeddings act within a head."""
    model, inputs = _phi()
    twin_odd_heads(model, inputs, [layer.self_attn.dense for layer in model.model.layers])
    fused, plain, report, expected = fuse_and_prune_plainly(model, inputs, 0.5, include=["*.q_proj"],
                                                            ot_config=OTConfig(features="producer"))
    assert [(g.name, g.width_after, g.merged) for g in report.groups] == [
        (f"model.layers.{i}.self_attn.q_proj", 16, 16) for i in range(2)]
    attn = fused.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (16, 32) and attn.dense.weight.shape == (32, 16)
    assert_only_fusion_keeps_the_outputs(fused, plain, inputs, expected)


def test_phi_is_pruned_whole_in_one_call():
    model, inputs = _phi()
    report = prune(model, inputs, 0.5)
    assert not report.unsupported
    assert {g.name for g in report.groups} >= {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    assert_reloads(model, _phi()[0], report, inputs)


class _GatedMLP(nn.Module):
    def __init__(self, interleaved: bool) -> None:
        super().__init__()
        self.interleaved = interleaved
        self.gate_up_proj, self.down_proj = nn.Linear(8, 32), nn.Linear(16, 8)

    def forward(self, x):
        h = self.gate_up_proj(x)
        gate, up = (h[..., ::2], h[..., 1::2]) if self.interleaved else h.chunk(2, -1)
        return self.down_proj(up * nn.functional.silu(gate))


def test_packed_layout_is_confirmed_on_the_module_itself():
    """``[gate | up]`` packing is recognised; an interleaved one (same names and shapes) is not, so its
    neurons are never removed by the wrong rows."""
    torch.manual_seed(0)
    assert is_packed_gated_mlp(_GatedMLP(interleaved=False))
    assert not is_packed_gated_mlp(_GatedMLP(interleaved=True))
    x = torch.randn(4, 8)
    packed = nn.Sequential(nn.Linear(8, 8), _GatedMLP(interleaved=False), nn.Linear(8, 3))
    report = prune(packed, x, 0.5, include=["1.gate_up_proj"])
    assert [(g.name, g.width_after) for g in report.groups] == [("1.gate_up_proj", 8)]
    assert packed[1].gate_up_proj.weight.shape == (16, 8) and packed(x).shape == (4, 3)
    interleaved = nn.Sequential(nn.Linear(8, 8), _GatedMLP(interleaved=True), nn.Linear(8, 3))
    before = state(interleaved)
    with pytest.raises(UnsupportedModelError, match="unevenly"):
        prune(interleaved, x, 0.5, include=["1.gate_up_proj"])
    assert_same_state(before, state(interleaved))
