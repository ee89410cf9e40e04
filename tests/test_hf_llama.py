"""A Hugging Face LLaMA (built from a small config, nothing downloaded): RMSNorm on the residual stream,
gated (SwiGLU) MLPs, and attention with rotary position embeddings (whose slicing and concatenation the
dependency graph cannot follow) and, optionally, grouped key/value heads: its heads are recognised by the
attention layer's attributes."""

import copy

import pytest
import torch

from helpers import (
    EvenUnitsFirst, assert_only_fusion_keeps_the_outputs, assert_reloads, duplicate_odd_units,
    fuse_and_prune_plainly, twin_odd_heads,
)
from lightning_intrafusion import OTConfig, UnsupportedModelError, prune

transformers = pytest.importorskip("transformers")

MLP_AND_HIDDEN = ["*.mlp.up_proj", "*.mlp.down_proj"]


FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "olmo2": ("Olmo2Config", "Olmo2ForCausalLM")}


def _llama(kv_heads: int = 4, family: str = "llama", tied: bool = False):
    """A 2-layer model of the LLaMA family (Qwen2: biased q/k/v projections; Gemma2: its own norms and
    attention scaling; Qwen3: an RMSNorm on every query and key head; OLMo-2: one on all of them together),
    4 query heads of 8 channels."""
    config_class, model_class = (getattr(transformers, name) for name in FAMILIES[family])
    torch.manual_seed(0)
    config = config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=kv_heads, head_dim=8, vocab_size=50, max_position_embeddings=16,
                          tie_word_embeddings=tied)
    model = model_class(config).eval()
    return model, {"input_ids": torch.randint(0, 50, (2, 8)), "use_cache": False}


def test_mlps_and_rmsnorm_hidden_width_fuse_exactly():
    model, inputs = _llama()
    duplicate_odd_units(model, inputs, include=MLP_AND_HIDDEN)
    fused, plain, report, expected = fuse_and_prune_plainly(model, inputs, 0.5, importance=EvenUnitsFirst(),
                                                            include=MLP_AND_HIDDEN, ot_config=OTConfig(features="producer"))
    assert sorted((g.name, g.width_after) for g in report.groups) == [
        ("model.layers.0.mlp.up_proj", 32), ("model.layers.1.mlp.down_proj", 16), ("model.layers.1.mlp.up_proj", 32)]
    assert fused.model.norm.weight.shape == (16,) and fused.model.layers[0].self_attn.q_proj.weight.shape == (32, 16)
    assert_only_fusion_keeps_the_outputs(fused, plain, inputs, expected)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_hidden_width_tied_to_the_output_layer_fuses_exactly_through_the_final_norm(family):
    """The output layer shares the input embedding, whose columns are removed without merging; the final
    RMSNorm (Gemma2's scales by 1 + weight) feeds only the output layer, so its kept channels are scaled to
    make up for the unmerged columns: twinned channels fuse exactly."""
    model, inputs = _llama(family=family, tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    duplicate_odd_units(model, inputs, include=MLP_AND_HIDDEN[1:])
    fused, plain, report, expected = fuse_and_prune_plainly(model, inputs, 0.5, importance=EvenUnitsFirst(),
                                                            include=MLP_AND_HIDDEN[1:], ot_config=OTConfig(features="producer"))
    assert [(g.name, g.width_after, g.merged) for g in report.groups] == [("model.layers.1.mlp.down_proj", 16, 16)]
    assert fused.lm_head.weight is fused.model.embed_tokens.weight and fused.lm_head.weight.shape == (50, 16)
    assert_only_fusion_keeps_the_outputs(fused, plain, inputs, expected)


@pytest.mark.parametrize("family, kv_heads", [("llama", 4), ("llama", 2), ("qwen2", 2), ("gemma2", 2), ("qwen3", 2)],
                         ids=["llama-multi-head", "llama-grouped-query", "qwen2", "gemma2", "qwen3"])
def test_heads_fuse_exactly_in_units_of_a_key_value_head(family, kv_heads):
    """Query heads 2m+1 (with grouped key/value heads: the query heads of key/value head 2m+1, and that
    key/value head) duplicate those of 2m; their output-projection columns are halved so that magnitude
    importance keeps the even units."""
    model, inputs = _llama(kv_heads, family)
    unit = 8 * 4 // kv_heads  # head_dim 8, 4 query heads
    twin_odd_heads(model, inputs, [layer.self_attn.o_proj for layer in model.model.layers], unit)
    fused, plain, report, expected = fuse_and_prune_plainly(model, inputs, 0.5, include=["*.q_proj"],
                                                            ot_config=OTConfig(features="producer"))
    assert [(g.name, g.width_after, g.merged) for g in report.groups] == [
        ("model.layers.0.self_attn.q_proj", 16, 16), ("model.layers.1.self_attn.q_proj", 16, 16)]
    attn = fused.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (16, 32) and attn.o_proj.weight.shape == (32, 16)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (4 * kv_heads, 32)  # half the key/value heads
    assert_only_fusion_keeps_the_outputs(fused, plain, inputs, expected)
    assert_reloads(fused, _llama(kv_heads, family)[0], report, inputs)


def test_gptj_heads_with_partial_rotary_embeddings_fuse_exactly():
    """GPT-J: separate q/k/v projections, an ``out_proj``, rotary embeddings on part of each head and no
    ``num_key_value_groups``: one key/value head per query head. Head 2m+1 duplicates head 2m."""
    torch.manual_seed(0)
    config = transformers.GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=50, rotary_dim=4, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    model = transformers.GPTJForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(0, 50, (2, 8)), "use_cache": False}
    twin_odd_heads(model, inputs, [block.attn.out_proj for block in model.transformer.h])
    fused, plain, report, expected = fuse_and_prune_plainly(model, inputs, 0.5, include=["*.q_proj"],
                                                            ot_config=OTConfig(features="producer"))
    assert [(g.name, g.width_after, g.merged) for g in report.groups] == [
        (f"transformer.h.{i}.attn.q_proj", 16, 16) for i in range(2)]
    assert fused.transformer.h[0].attn.k_proj.weight.shape == (16, 32)
    assert_only_fusion_keeps_the_outputs(fused, plain, inputs, expected)


@pytest.mark.parametrize("family, kv_heads", [("llama", 4), ("llama", 2), ("qwen2", 2), ("mistral", 2), ("gemma2", 2),
                                             ("qwen3", 2)])
def test_one_call_prunes_heads_mlps_and_hidden_width(family, kv_heads):
    model, inputs = _llama(kv_heads, family)
    report = prune(model, inputs, 0.5)
    assert not report.unsupported
    assert {g.name: g.width_after for g in report.groups} == {
        "model.layers.0.mlp.up_proj": 32, "model.layers.1.mlp.up_proj": 32, "model.layers.1.mlp.down_proj": 16,
        "model.layers.0.self_attn.q_proj": 16, "model.layers.1.self_attn.q_proj": 16}
    with torch.no_grad():
        assert model(**inputs).logits.shape == (2, 8, 50)
    assert_reloads(model, _llama(kv_heads, family)[0], report, inputs)


def test_heads_under_one_norm_across_all_heads_are_refused_and_the_rest_prunes():
    """OLMo-2 normalises the whole query (and key) projection with one RMSNorm: removing a head would change
    every other head's normalisation, so the heads are refused (the model untouched) and "skip" prunes the
    MLP neurons and the hidden width."""
    model, inputs = _llama(2, "olmo2")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedModelError, match="its q_norm normalises all heads' 32 channels together"):
        prune(model, inputs, 0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match="left 2 channel group"):
        report = prune(model, inputs, 0.5, on_unsupported="skip")
    assert sorted(report.unsupported) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert {g.name for g in report.groups} == {"model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj",
                                               "model.layers.1.mlp.down_proj"}
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 16)  # heads whole, hidden width halved
    with torch.no_grad():
        assert model(**inputs).logits.shape == (2, 8, 50)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_linear_compensation_and_refit_serve_bias_free_projections(kv_heads):
    """LLaMA's projections have no bias: linear compensation regresses removed heads and neurons on the kept
    ones without an intercept (mean compensation has nothing to carry it), the refit solves without one, and
    the pruned model's logits on held-out tokens come closer to the unpruned model's."""
    model, inputs = _llama(kv_heads)
    batches = [{"input_ids": torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(i)), "use_cache": False}
               for i in range(8)]
    held_out = {"input_ids": torch.randint(0, 50, (16, 8), generator=torch.Generator().manual_seed(99)), "use_cache": False}
    with torch.no_grad():
        expected = model(**held_out).logits
    errors = {}
    for compensation in ("linear", "refit", "none"):
        pruned = copy.deepcopy(model)
        prune(pruned, inputs, 0.5, calibration_data=batches, compensation=compensation, on_unsupported="skip")
        with torch.no_grad():
            errors[compensation] = ((pruned(**held_out).logits - expected).norm() / expected.norm()).item()
    assert errors["linear"] < 0.9 * errors["none"] and errors["refit"] < 0.9 * errors["none"], errors
