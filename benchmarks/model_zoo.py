"""Which Hugging Face architectures prune, and how far: every family here is built from a small config
(random weights, nothing downloaded) and pruned one-shot at 30% with the defaults, once as ``prune()`` does
by default (``on_unsupported="raise"``: the whole model in one call, or a clear error and the model left
as it was) and once with ``on_unsupported="skip"`` (what cannot be pruned exactly stays whole, the rest is
pruned). Exactness per family is the tests' job (``tests/test_hf_*.py``); this is the compatibility table.

    python benchmarks/model_zoo.py            # all 62 families (about a minute; FocalNet alone ~20 s)
    python benchmarks/model_zoo.py bert gpt2  # some of them
"""

from __future__ import annotations

import copy
import re
import sys
import time
import warnings
from typing import Any, Callable, Dict, Tuple

import torch
from torch import nn

from lightning_intrafusion import UnsupportedModelError, prune

try:
    import transformers as T
except ImportError:  # pragma: no cover
    sys.exit("this benchmark needs transformers (pip install -e '.[test]')")

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=50)
VISION = {k: v for k, v in TEXT.items() if k != "vocab_size"}
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
TOKENS, CAUSAL, PIXELS, AUDIO = "tokens", "causal", "pixels", "audio"


def _kv(config: Callable[..., Any], **extra: Any) -> Callable[[], Any]:
    return lambda: config(**TEXT, num_key_value_heads=2, **IDS, **extra)


# family: (model class, config factory, inputs)
FAMILIES: Dict[str, Tuple[Callable[[Any], nn.Module], Callable[[], Any], str]] = {
    # decoder-only language models
    "llama": (T.LlamaForCausalLM, _kv(T.LlamaConfig), CAUSAL),
    "mistral": (T.MistralForCausalLM, _kv(T.MistralConfig), CAUSAL),
    "qwen2": (T.Qwen2ForCausalLM, _kv(T.Qwen2Config), CAUSAL),
    "qwen3": (T.Qwen3ForCausalLM, _kv(T.Qwen3Config, head_dim=8), CAUSAL),
    "gemma2": (T.Gemma2ForCausalLM, _kv(T.Gemma2Config, head_dim=8), CAUSAL),
    "gemma3": (T.Gemma3ForCausalLM, _kv(T.Gemma3TextConfig, head_dim=8), CAUSAL),
    "olmo": (T.OlmoForCausalLM, _kv(T.OlmoConfig), CAUSAL),
    "olmo2": (T.Olmo2ForCausalLM, _kv(T.Olmo2Config), CAUSAL),
    "granite": (T.GraniteForCausalLM, _kv(T.GraniteConfig), CAUSAL),
    "cohere": (T.CohereForCausalLM, _kv(T.CohereConfig), CAUSAL),
    "helium": (T.HeliumForCausalLM, _kv(T.HeliumConfig, head_dim=8), CAUSAL),
    "nemotron": (T.NemotronForCausalLM, _kv(T.NemotronConfig), CAUSAL),
    "stablelm": (T.StableLmForCausalLM, _kv(T.StableLmConfig), CAUSAL),
    "starcoder2": (T.Starcoder2ForCausalLM, _kv(T.Starcoder2Config), CAUSAL),
    "mixtral": (T.MixtralForCausalLM, _kv(T.MixtralConfig, num_local_experts=4, num_experts_per_tok=2), CAUSAL),
    "qwen2_moe": (T.Qwen2MoeForCausalLM, _kv(T.Qwen2MoeConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                            shared_expert_intermediate_size=32), CAUSAL),
    "phi": (T.PhiForCausalLM, lambda: T.PhiConfig(**TEXT, **IDS), CAUSAL),
    "phi3": (T.Phi3ForCausalLM, _kv(T.Phi3Config, tie_word_embeddings=False), CAUSAL),
    "gpt2": (T.GPT2LMHeadModel, lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16,
                                                      bos_token_id=1, eos_token_id=2), CAUSAL),
    "gpt_neox": (T.GPTNeoXForCausalLM, lambda: T.GPTNeoXConfig(**TEXT, **IDS), CAUSAL),
    "gptj": (T.GPTJForCausalLM, lambda: T.GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=50, rotary_dim=4,
                                                      n_positions=16, **IDS), CAUSAL),
    "bloom": (T.BloomForCausalLM, lambda: T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=50, **IDS), CAUSAL),
    "falcon": (T.FalconForCausalLM, lambda: T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                            vocab_size=50, **IDS), CAUSAL),
    "gpt_bigcode": (T.GPTBigCodeForCausalLM, lambda: T.GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=50,
                                                                         n_positions=16, **IDS), CAUSAL),
    "codegen": (T.CodeGenForCausalLM, lambda: T.CodeGenConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16,
                                                               rotary_dim=4, **IDS), CAUSAL),
    "opt": (T.OPTForCausalLM, lambda: T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                                   vocab_size=50, word_embed_proj_dim=32, **IDS), CAUSAL),
    "persimmon": (T.PersimmonForCausalLM, lambda: T.PersimmonConfig(**TEXT, **IDS), CAUSAL),
    # encoders
    "bert": (T.BertForSequenceClassification, lambda: T.BertConfig(**TEXT), TOKENS),
    "bert_mlm": (T.BertForMaskedLM, lambda: T.BertConfig(**TEXT), TOKENS),  # output layer tied through a dense layer
    "roberta": (T.RobertaForSequenceClassification, lambda: T.RobertaConfig(**TEXT, max_position_embeddings=40), TOKENS),
    "electra": (T.ElectraForSequenceClassification, lambda: T.ElectraConfig(**TEXT, embedding_size=16), TOKENS),
    "albert": (T.AlbertForSequenceClassification, lambda: T.AlbertConfig(**TEXT, embedding_size=16), TOKENS),
    "distilbert": (T.DistilBertForSequenceClassification, lambda: T.DistilBertConfig(dim=32, n_layers=2, n_heads=4,
                                                                                      hidden_dim=64, vocab_size=50), TOKENS),
    "deberta_v2": (T.DebertaV2ForSequenceClassification, lambda: T.DebertaV2Config(**TEXT), TOKENS),
    "mpnet": (T.MPNetForSequenceClassification, lambda: T.MPNetConfig(**TEXT), TOKENS),
    "modernbert": (T.ModernBertForSequenceClassification, lambda: T.ModernBertConfig(
        **TEXT, global_attn_every_n_layers=2, **IDS, cls_token_id=1, sep_token_id=2), TOKENS),
    "mobilebert": (T.MobileBertForSequenceClassification, lambda: T.MobileBertConfig(
        **TEXT, embedding_size=16, intra_bottleneck_size=16, num_feedforward_networks=2), TOKENS),
    "squeezebert": (T.SqueezeBertForSequenceClassification, lambda: T.SqueezeBertConfig(**TEXT, embedding_size=32), TOKENS),
    "funnel": (T.FunnelForSequenceClassification, lambda: T.FunnelConfig(d_model=32, n_head=4, d_head=8, d_inner=64,
                                                                          block_sizes=[1, 1], vocab_size=50), TOKENS),
    "bart": (T.BartForSequenceClassification, lambda: T.BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=50, **IDS), "seq2seq"),
    # vision
    "vit": (T.ViTForImageClassification, lambda: T.ViTConfig(**VISION, image_size=32, patch_size=8), PIXELS),
    "deit": (T.DeiTForImageClassification, lambda: T.DeiTConfig(**VISION, image_size=32, patch_size=8), PIXELS),
    "beit": (T.BeitForImageClassification, lambda: T.BeitConfig(**VISION, image_size=32, patch_size=8), PIXELS),
    "dinov2": (T.Dinov2ForImageClassification, lambda: T.Dinov2Config(
        **{k: v for k, v in VISION.items() if k != "intermediate_size"}, mlp_ratio=2, image_size=32, patch_size=8), PIXELS),
    "clip_vision": (T.CLIPVisionModelWithProjection, lambda: T.CLIPVisionConfig(**VISION, image_size=32, patch_size=8,
                                                                                 projection_dim=16), PIXELS),
    "siglip": (T.SiglipForImageClassification, lambda: T.SiglipConfig(
        vision_config=dict(**VISION, image_size=32, patch_size=8), text_config=dict(TEXT)), PIXELS),
    "swin": (T.SwinForImageClassification, lambda: T.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 4], image_size=32,
                                                                 patch_size=4, window_size=4), PIXELS),
    "convnext": (T.ConvNextForImageClassification, lambda: T.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]),
                 PIXELS),
    "convnextv2": (T.ConvNextV2ForImageClassification, lambda: T.ConvNextV2Config(num_stages=2, hidden_sizes=[16, 32],
                                                                                  depths=[1, 1]), PIXELS),
    "resnet": (T.ResNetForImageClassification, lambda: T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1]),
               PIXELS),
    "regnet": (T.RegNetForImageClassification, lambda: T.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                                       groups_width=8), PIXELS),
    "mobilenet_v2": (T.MobileNetV2ForImageClassification, lambda: T.MobileNetV2Config(depth_multiplier=0.35, image_size=32),
                     PIXELS),
    "efficientnet": (T.EfficientNetForImageClassification, lambda: T.EfficientNetConfig(
        width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320, image_size=32), PIXELS),
    "mobilevit": (T.MobileViTForImageClassification, lambda: T.MobileViTConfig(
        image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 48]), PIXELS),
    "levit": (T.LevitForImageClassification, lambda: T.LevitConfig(
        image_size=32, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8]), PIXELS),
    "segformer": (T.SegformerForImageClassification, lambda: T.SegformerConfig(
        hidden_sizes=[16, 32, 32, 32], num_attention_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1]), PIXELS),
    "poolformer": (T.PoolFormerForImageClassification, lambda: T.PoolFormerConfig(hidden_sizes=[16, 32, 32, 32],
                                                                                  depths=[1, 1, 1, 1]), PIXELS),
    "pvt_v2": (T.PvtV2ForImageClassification, lambda: T.PvtV2Config(
        hidden_sizes=[16, 32, 32, 32], num_attention_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1], image_size=32), PIXELS),
    "hiera": (T.HieraForImageClassification, lambda: T.HieraConfig(
        embed_dim=16, depths=[1, 1], num_heads=[1, 2], image_size=[32, 32], patch_size=[3, 3], patch_stride=[2, 2],
        patch_padding=[1, 1], masked_unit_size=[4, 4], query_stride=[2, 2], num_query_pool=1), PIXELS),
    "focalnet": (T.FocalNetForImageClassification, lambda: T.FocalNetConfig(embed_dim=16, depths=[1, 1], image_size=32,
                                                                             patch_size=4), PIXELS),
    # audio
    "wav2vec2": (T.Wav2Vec2ForSequenceClassification, lambda: T.Wav2Vec2Config(
        **VISION, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4), AUDIO),
    "whisper": (T.WhisperForAudioClassification, lambda: T.WhisperConfig(
        d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, num_mel_bins=16, max_source_positions=20,
        vocab_size=50), "mel"),
}


def example_inputs(kind: str) -> Dict[str, Any]:
    if kind == PIXELS:
        return {"pixel_values": torch.randn(2, 3, 32, 32)}
    if kind == AUDIO:
        return {"input_values": torch.randn(2, 400)}
    if kind == "mel":
        return {"input_features": torch.randn(2, 16, 40)}
    ids = {"input_ids": torch.randint(3, 50, (2, 8))}
    ids["input_ids"][:, -1] = 2  # an end-of-sequence token (BART classifies there)
    return ids if kind == TOKENS else {**ids, "use_cache": False}  # no key/value cache: outputs made of tensors


def _reason(message: str, limit: int = 120) -> str:
    """``'layer': why`` from a refusal (its first sentence), shortened for the table."""
    first = message.split(". ")[0].replace("|", "/")
    match = re.match(r"(?:cannot prune the channel group of|with the channel group of) '([^']+)'(?: pruned on its own)?[:,] (.*)",
                     first)
    if match:
        first = f"{match.group(1)}: {match.group(2)}"
    return first if len(first) <= limit else first[:limit - 3] + "..."


def run(family: str) -> Tuple[str, bool]:
    """The family's table row, and whether the whole model pruned in one call."""
    model_class, config, kind = FAMILIES[family]
    torch.manual_seed(0)
    model = model_class(config()).eval()
    inputs = example_inputs(kind)
    params = sum(p.numel() for p in model.parameters())
    started = time.perf_counter()
    try:
        report = prune(copy.deepcopy(model), inputs, 0.3)
        raised, whole = f"pruned: {len(report.groups)} groups, {report.params_after / params:.0%} of the parameters left", True
    except (UnsupportedModelError, RuntimeError, ValueError) as err:
        raised, whole = f"refused ({type(err).__name__}): {_reason(str(err))}", False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skip warning lists what the report says
            report = prune(model, inputs, 0.3, on_unsupported="skip")
        skipped = (f"{len(report.groups)} groups pruned, {len(report.unsupported)} left whole, "
                   f"{report.params_after / params:.0%} of the parameters left")
    except (UnsupportedModelError, RuntimeError, ValueError) as err:
        skipped = f"error ({type(err).__name__}): {_reason(str(err))}"
    return f"| {family} | {params:,} | {raised} | {skipped} | {time.perf_counter() - started:.1f} |", whole


def main() -> None:
    T.logging.set_verbosity_error()  # small vocabularies: notes on the configs' default token ids
    names = sys.argv[1:] or list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        sys.exit(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    print(f"command: python benchmarks/model_zoo.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"torch {torch.__version__}, transformers {T.__version__}; one-shot Intra-Fusion at 30% sparsity, defaults\n")
    print("| family | params | prune(model, inputs, 0.3) | on_unsupported=\"skip\" | seconds (both) |")
    print("|---|---|---|---|---|")
    whole = 0
    for name in names:
        row, pruned_whole = run(name)
        whole += pruned_whole
        print(row, flush=True)
    print(f"\n{whole} of {len(names)} families pruned whole in one call; the others refused with the model untouched, "
          "and pruned in part with on_unsupported='skip'")


if __name__ == "__main__":
    main()
