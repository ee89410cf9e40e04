"""A Hugging Face LLaMA (built from a small config, nothing downloaded): RMSNorm on the residual stream,
gated (SwiGLU) MLPs, rotary position embeddings whose slicing and concatenation the dependency graph
cannot follow. One call with ``on_unsupported="skip"`` prunes the MLPs and the hidden width and leaves
the attention whole."""

import copy

import pytest
import torch

from helpers import EvenUnitsFirst, duplicate_odd_units
from lightning_intrafusion import OTConfig, prune

transformers = pytest.importorskip("transformers")

MLP_AND_HIDDEN = ["*.mlp.up_proj", "*.mlp.down_proj"]


def _llama(kv_heads: int = 4):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=kv_heads, vocab_size=50, max_position_embeddings=16,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    return model, {"input_ids": torch.randint(0, 50, (2, 8)), "use_cache": False}


def test_mlps_and_rmsnorm_hidden_width_fuse_exactly_and_attention_is_left_whole():
    model, inputs = _llama()
    duplicate_odd_units(model, inputs, include=MLP_AND_HIDDEN)
    with torch.no_grad():
        expected = model(**inputs).logits
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    with pytest.warns(UserWarning, match="left 2 channel group"):
        report = prune(fused, inputs, 0.5, importance=EvenUnitsFirst(), on_unsupported="skip",
                       ot_config=OTConfig(features="producer"))
    with pytest.warns(UserWarning):
        prune(plain, inputs, 0.5, importance=EvenUnitsFirst(), on_unsupported="skip", method="default")
    assert sorted((g.name, g.width_after) for g in report.groups) == [
        ("model.layers.0.mlp.up_proj", 32), ("model.layers.1.mlp.down_proj", 16), ("model.layers.1.mlp.up_proj", 32)]
    assert sorted(report.unsupported) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert fused.model.norm.weight.shape == (16,) and fused.model.layers[0].self_attn.q_proj.weight.shape == (32, 16)
    with torch.no_grad():
        assert torch.allclose(fused(**inputs).logits, expected, atol=1e-5)
        assert (plain(**inputs).logits - expected).abs().max() > 1e-2


def test_grouped_query_attention_groups_time_out_and_the_rest_prunes(monkeypatch):
    """With fewer key/value heads than query heads Torch-Pruning's group search never ends on the
    attention groups. Those of the first layer are given up after the time limit; the same projections
    of the next layer are refused at once, without waiting again; the other groups prune."""
    import lightning_intrafusion.graph as graph_module

    monkeypatch.setattr(graph_module, "GROUP_SECONDS", 0.5)
    model, inputs = _llama(kv_heads=2)
    with pytest.warns(UserWarning, match="left 6 channel group"):
        report = prune(model, inputs, 0.5, on_unsupported="skip")
    first, second = "model.layers.0.self_attn.", "model.layers.1.self_attn."
    assert sorted(report.unsupported) == sorted(layer + p for layer in (first, second) for p in ("q_proj", "k_proj", "v_proj"))
    for projection in ("q_proj", "k_proj", "v_proj"):  # one layer waited (whichever the graph met first)
        waited, refused = sorted((first + projection, second + projection),
                                 key=lambda name: "same place" in report.unsupported[name])
        assert "could not resolve its dependencies within 0.5 s" in report.unsupported[waited]
        assert (f"could not resolve the dependencies of '{waited}' within 0.5 s, and this layer has the same place "
                "in another repeated block") in report.unsupported[refused]
    assert {g.name for g in report.groups} == {"model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj",
                                               "model.layers.1.mlp.up_proj"}
    assert model(**inputs).logits.shape == (2, 8, 50)
