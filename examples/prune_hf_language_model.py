"""One-shot pruning of a Hugging Face language model, saved and reloaded.

Nothing is downloaded: the model is built from a small config (pass ``--family`` to pick one) with random
weights, so the point is the mechanics, not the accuracy: what one ``prune()`` call removes (attention
heads, MLP neurons, hidden width), what it leaves whole and why, and how the pruned model is reloaded
(its config still describes the original widths: build it from the config, replay the recorded removals,
then load the weights). For a real checkpoint, replace ``from_config`` by ``from_pretrained``.

    python examples/prune_hf_language_model.py
    python examples/prune_hf_language_model.py --family gpt_neox --sparsity 0.3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import transformers

from lightning_intrafusion import prune
from lightning_intrafusion.surgery import replay_history

SMALL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8, vocab_size=1000)
FAMILIES = {  # config class, model class, extra config
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=4, pad_token_id=0, tie_word_embeddings=False)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict()),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=384, word_embed_proj_dim=128)),
}


def build(family: str) -> torch.nn.Module:
    config_name, model_name, extra = FAMILIES[family]
    kwargs = dict(SMALL, **extra)
    if family == "opt":
        kwargs.pop("intermediate_size")
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=list(FAMILIES), default="llama")
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()

    model = build(args.family)
    inputs = {"input_ids": torch.randint(0, SMALL["vocab_size"], (2, 16)), "use_cache": False}
    report = prune(model, inputs, args.sparsity, on_unsupported="skip", verbose=True)  # progress + summary
    for name, why in report.unsupported.items():
        print(f"left whole: {name}: {why}")

    with tempfile.TemporaryDirectory() as folder:  # what a user saves: weights and the removal record
        torch.save(model.state_dict(), os.path.join(folder, "pruned.pt"))
        with open(os.path.join(folder, "removals.json"), "w") as f:
            json.dump([report.removals], f)
        fresh = build(args.family)  # from the (unchanged) config
        with open(os.path.join(folder, "removals.json")) as f:
            replay_history(fresh, json.load(f))
        fresh.load_state_dict(torch.load(os.path.join(folder, "pruned.pt"), weights_only=True))
    with torch.no_grad():
        same = torch.equal(fresh(**inputs).logits, model(**inputs).logits)
    print(f"reloaded from config + removals + weights: identical outputs: {same}")


if __name__ == "__main__":
    main()
