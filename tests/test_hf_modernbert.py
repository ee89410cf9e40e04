"""A Hugging Face ModernBERT (built from a small config, nothing downloaded): attention computed from one
``Wqkv`` projection holding all queries, then all keys, then all values, viewed as ``(..., 3, heads,
head_dim)``; a gated MLP whose gate and up projections are packed in ``Wi`` and chunked. The graph
follows neither, so both are recognised by their attributes."""

import pytest
import torch

from helpers import (
    assert_only_fusion_keeps_the_outputs, assert_reloads, duplicate_odd_units, fuse_and_prune_plainly,
    prune_with_mirrored_momentum, rank_odd_units_last,
)
from lightning_intrafusion import OTConfig, prune
from lightning_intrafusion.sectioned_attention import is_sectioned_attention

transformers = pytest.importorskip("transformers")

HEADS = ["*.attn.Wqkv"]
MLPS = ["*.mlp.Wi"]


def _modernbert():
    """2 layers (one global, one sliding-window attention), 4 heads of 8 channels, 64 MLP neurons."""
    torch.manual_seed(0)
    config = transformers.ModernBertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           vocab_size=50, global_attn_every_n_layers=2, num_labels=3, pad_token_id=0,
                                           bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    return transformers.ModernBertForSequenceClassification(config).eval(), {"input_ids": torch.randint(3, 50, (2, 8))}


def test_heads_fuse_exactly():
    """Head 2m+1 duplicates head 2m (its query, key and value rows). Every row and column has unit norm
    but odd heads' ``Wo`` columns, halved, so that magnitude keeps the even heads. Fusion keeps the
    outputs, plain pruning of the same heads does not."""
    model, inputs = _modernbert()
    for layer in model.model.layers:
        rank_odd_units_last(layer.attn.Wqkv, layer.attn.Wo, unit=8)
    duplicate_odd_units(model, inputs, include=HEADS, units={HEADS[0]: 8})
    fused, plain, report, expected = fuse_and_prune_plainly(model, inputs, 0.5, importance="l2", include=HEADS,
                                                            ot_config=OTConfig(features="producer"))
    assert [(g.name, g.width_before, g.width_after, g.merged) for g in report.groups] == [
        (f"model.layers.{i}.attn.Wqkv", 32, 16, 16) for i in range(2)]
    attn = fused.model.layers[0].attn
    assert attn.Wqkv.weight.shape == (48, 32) and attn.Wo.weight.shape == (32, 16)
    assert_only_fusion_keeps_the_outputs(fused, plain, inputs, expected)


def test_packed_gated_neurons_fuse_exactly():
    """Neuron 2m+1 (its input row and its gate row in ``Wi``) duplicates neuron 2m; odd neurons' ``Wo``
    columns halved so that magnitude keeps the even ones."""
    model, inputs = _modernbert()
    for layer in model.model.layers:
        rank_odd_units_last(layer.mlp.Wi, layer.mlp.Wo)
    duplicate_odd_units(model, inputs, include=MLPS)
    fused, plain, report, expected = fuse_and_prune_plainly(model, inputs, 0.5, importance="l2", include=MLPS,
                                                            ot_config=OTConfig(features="producer"))
    assert [(g.name, g.width_before, g.width_after, g.merged) for g in report.groups] == [
        (f"model.layers.{i}.mlp.Wi", 64, 32, 32) for i in range(2)]
    mlp = fused.model.layers[0].mlp
    assert mlp.Wi.weight.shape == (64, 32) and mlp.Wo.weight.shape == (32, 32)
    assert_only_fusion_keeps_the_outputs(fused, plain, inputs, expected)


def test_one_call_prunes_heads_mlps_and_hidden_width_and_reloads():
    model, inputs = _modernbert()
    report = prune(model, inputs, 0.5)
    assert not report.unsupported
    assert {g.name for g in report.groups} >= {f"model.layers.{i}.{part}" for i in range(2) for part in ("attn.Wqkv", "mlp.Wi")}
    assert model.model.embeddings.tok_embeddings.weight.shape == (50, 16)  # the hidden width too
    with torch.no_grad():
        assert model(**inputs).logits.shape == (2, 3)
    assert_reloads(model, _modernbert()[0], report, inputs)


def test_optimizer_state_of_sectioned_heads_and_packed_neurons_is_sliced_like_the_weights():
    model, inputs = _modernbert()
    prune_with_mirrored_momentum(model, lambda m: prune(m, inputs, 0.5, include=HEADS + MLPS, method="default"))
    assert model.model.layers[0].attn.Wqkv.weight.shape == (48, 32)
    assert model.model.layers[0].mlp.Wi.weight.shape == (64, 32)


def test_a_layer_holding_its_head_count_is_left_to_the_graph():
    """A forward may reshape with a head-count attribute, which pruning would leave stale."""
    model, _ = _modernbert()
    attn = model.model.layers[0].attn
    assert is_sectioned_attention(attn)
    attn.num_heads = 4
    assert not is_sectioned_attention(attn)
