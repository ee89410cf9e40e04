"""Hugging Face model families built from small configs (nothing downloaded), checked for *what* a pruned
model computes, not only that it runs: every unit (MLP neuron, attention head, key/value head group) that
can be pruned, except widths under a norm layer, is first silenced on alternate units, so plain pruning
must remove exactly the silent ones and leave the outputs unchanged. A removal at the wrong positions, or
a forward that reshapes with a stale head count (Hugging Face OPT and StableLM keep theirs as attributes:
``view(batch, -1, self.num_heads, head_dim)`` would regroup tokens without an error), fails it."""

import copy
import warnings

import pytest
import torch

from helpers import silence_odd_units

transformers = pytest.importorskip("transformers")

from lightning_intrafusion import prune  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=50)



FAMILIES = {
    "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=50, word_embed_proj_dim=32)),
    "stablelm": lambda: transformers.StableLmForCausalLM(transformers.StableLmConfig(**SMALL, num_key_value_heads=2)),
    "starcoder2": lambda: transformers.Starcoder2ForCausalLM(transformers.Starcoder2Config(**SMALL, num_key_value_heads=2)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "gptj": lambda: transformers.GPTJForCausalLM(transformers.GPTJConfig(
        n_embd=32, n_layer=2, n_head=4, vocab_size=50, rotary_dim=4, n_positions=16)),
    "bloom": lambda: transformers.BloomForCausalLM(transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=50)),
    "distilbert": lambda: transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=50)),
    "bart": lambda: transformers.BartForSequenceClassification(transformers.BartConfig(  # with cross-attention
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=50, num_labels=3)),
    "modernbert": lambda: transformers.ModernBertForSequenceClassification(transformers.ModernBertConfig(  # packed qkv, GLU
        **SMALL, global_attn_every_n_layers=2, num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2)),
    "deberta_v2": lambda: transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(  # written-out attention
        **SMALL, num_labels=3)),
    "squeezebert": lambda: transformers.SqueezeBertForSequenceClassification(transformers.SqueezeBertConfig(  # grouped
        **SMALL, embedding_size=32, num_labels=3)),  # 1x1 convs, attention written out (its heads declared)
    "wav2vec2": lambda: transformers.Wav2Vec2ForSequenceClassification(transformers.Wav2Vec2Config(  # conv + transformer
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_labels=3)),
}
CACHED = {"opt", "stablelm", "starcoder2", "mixtral", "gptj", "bloom", "bart"}  # outputs a cache unless told not to
HEADS = {"opt": 2, "stablelm": 2, "starcoder2": 2, "mixtral": 2, "distilbert": 2, "wav2vec2": 2, "bart": 3,
         "modernbert": 2, "deberta_v2": 2, "squeezebert": 2, "gptj": 2}  # attention groups expected


@pytest.mark.parametrize("family", list(FAMILIES))
def test_removing_silenced_units_leaves_the_outputs_unchanged(family):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # configs' notes on token ids
        model = FAMILIES[family]().eval()
    inputs = {"input_ids": torch.randint(3, 50, (2, 8))}
    if family == "bart":  # classified at the end-of-sequence token
        inputs["input_ids"][:, -1] = 2
    if family == "wav2vec2":
        inputs = {"input_values": torch.randn(2, 400)}
    if family in CACHED:
        inputs["use_cache"] = False
    silenced = silence_odd_units(model, inputs)
    with torch.no_grad():
        expected = model(**inputs).logits
    pruned = copy.deepcopy(model)
    report = prune(pruned, inputs, 0.5, method="default", importance="l2", include=silenced)
    assert len(report.groups) == len(silenced) >= 2 and report.params_after < report.params_before
    heads = [g for g in report.groups if "attn" in g.name or "attention" in g.name]
    assert len(heads) == HEADS.get(family, 0), sorted(g.name for g in report.groups)
    with torch.no_grad():
        assert torch.allclose(pruned(**inputs).logits, expected, atol=1e-5)
