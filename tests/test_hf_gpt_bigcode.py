"""Hugging Face GPT-BigCode (StarCoder) with multi-query attention, built from a small config (nothing downloaded):
``c_attn`` packs every query head and one key/value head that all query heads share."""

import pytest
import torch

from helpers import assert_only_fusion_keeps_the_outputs, assert_reloads, fuse_and_prune_plainly, twin_odd_heads
from lightning_intrafusion import OTConfig, prune

transformers = pytest.importorskip("transformers")


def _bigcode():
    torch.manual_seed(0)
    config = transformers.GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16, multi_query=True,
                                           bos_token_id=0, eos_token_id=0)
    return transformers.GPTBigCodeForCausalLM(config).eval(), {"input_ids": torch.randint(0, 50, (2, 8)), "use_cache": False}


def test_query_heads_of_multi_query_attention_fuse_exactly():
    """Query head 2m+1 twins head 2m (the shared key/value head stays whole): fusion keeps the outputs, plain
    pruning does not; the split, the key/value repeat and the head count follow the pruning."""
    model, inputs = _bigcode()
    twin_odd_heads(model, inputs, [block.attn.c_proj for block in model.transformer.h], 8, "*.c_attn")
    fused, plain, report, expected = fuse_and_prune_plainly(model, inputs, 0.5, include=["*.c_attn"],
                                                            ot_config=OTConfig(features="producer"))
    assert [(g.name, g.width_after, g.merged) for g in report.groups] == [
        (f"transformer.h.{i}.attn.c_attn", 16, 16) for i in range(2)]
    attn = fused.transformer.h[0].attn
    assert attn.c_attn.weight.shape == (16 + 2 * 8, 32) and attn.c_proj.weight.shape == (32, 16)
    assert (attn.num_heads, attn.num_key_value_groups, attn.embed_dim, attn.split_size) == (2, 2, 16, 16)
    assert_only_fusion_keeps_the_outputs(fused, plain, inputs, expected)
    assert_reloads(fused, _bigcode()[0], report, inputs)


def test_whole_model_prunes_in_one_call_and_generates():
    model, inputs = _bigcode()
    report = prune(model, inputs, 0.5)
    assert not report.unsupported
    assert {f"transformer.h.{i}.attn.c_attn" for i in range(2)} <= {g.name for g in report.groups}
    fresh = _bigcode()[0]
    assert_reloads(model, fresh, report, inputs)
    prompt = inputs["input_ids"][:1]  # with the key/value cache
    assert torch.equal(model.generate(prompt, max_new_tokens=3, do_sample=False),
                       fresh.generate(prompt, max_new_tokens=3, do_sample=False))
