"""A Hugging Face GPT-NeoX (Pythia's architecture; built from a small config, nothing downloaded): each
head's query, key and value rows lie together in one ``query_key_value`` projection, viewed as
``(..., heads, 3 * head_size)`` and chunked, with partial rotary embeddings; the graph cannot follow the
view, so the layer is recognised by its attributes."""

import pytest
import torch

from helpers import (
    assert_only_fusion_keeps_the_outputs, assert_reloads, duplicate_odd_units, fuse_and_prune_plainly,
    prune_with_mirrored_momentum, rank_odd_units_last,
)
from lightning_intrafusion import OTConfig, prune

transformers = pytest.importorskip("transformers")

HEADS = ["*.query_key_value"]


def _gpt_neox():
    """2 layers, 4 heads of 8 channels, rotary embeddings on a quarter of each head."""
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        vocab_size=50, max_position_embeddings=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPTNeoXForCausalLM(config).eval(), {"input_ids": torch.randint(0, 50, (2, 8)), "use_cache": False}


def test_heads_fuse_exactly():
    """Head 2m+1 duplicates head 2m (its query, key and value rows). Every row and column has unit norm
    but odd heads' ``dense`` columns, halved, so that magnitude keeps the even heads. Fusion keeps the
    outputs, plain pruning of the same heads does not."""
    model, inputs = _gpt_neox()
    for layer in model.gpt_neox.layers:
        rank_odd_units_last(layer.attention.query_key_value, layer.attention.dense, unit=8)
    duplicate_odd_units(model, inputs, include=HEADS, units={HEADS[0]: 8})
    fused, plain, report, expected = fuse_and_prune_plainly(model, inputs, 0.5, importance="l2", include=HEADS,
                                                            ot_config=OTConfig(features="producer"))
    assert [(g.name, g.width_before, g.width_after, g.merged) for g in report.groups] == [
        (f"gpt_neox.layers.{i}.attention.query_key_value", 32, 16, 16) for i in range(2)]
    attn = fused.gpt_neox.layers[0].attention
    assert attn.query_key_value.weight.shape == (48, 32) and attn.dense.weight.shape == (32, 16)
    assert_only_fusion_keeps_the_outputs(fused, plain, inputs, expected)


def test_one_call_prunes_heads_mlps_and_hidden_width_and_reloads():
    model, inputs = _gpt_neox()
    report = prune(model, inputs, 0.5)
    assert not report.unsupported
    assert {g.name for g in report.groups} >= {f"gpt_neox.layers.{i}.attention.query_key_value" for i in range(2)}
    assert model.gpt_neox.embed_in.weight.shape == (50, 16)  # the hidden width too
    with torch.no_grad():
        assert model(**inputs).logits.shape == (2, 8, 50)
    assert_reloads(model, _gpt_neox()[0], report, inputs)


def test_optimizer_state_of_interleaved_heads_is_sliced_like_the_weights():
    model, inputs = _gpt_neox()
    prune_with_mirrored_momentum(model, lambda m: prune(m, inputs, 0.5, include=HEADS, method="default"))
    assert model.gpt_neox.layers[0].attention.query_key_value.weight.shape == (48, 32)
