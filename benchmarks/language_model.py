"""One-shot pruning of a small Hugging Face language model trained on real text: Python's own standard library.

Nothing is downloaded: the text is the ``.py`` sources of the interpreter's standard library (about 4.7 MB
of bytes; every 8th file held out), the model a byte-level ``LlamaForCausalLM`` built from a config (hidden
128, SwiGLU MLP 512, 4 layers, 8 query heads in 4 key/value groups: 1.05M parameters) or, with
``--family gpt2``, a ``GPT2LMHeadModel`` of the same widths (GELU MLP, packed qkv), trained on the CPU
and cached in ``benchmarks/.cache`` (about 6 minutes per model on 2 cores). Its MLP neurons and attention
heads (LLaMA's in units of a key/value group) are pruned one-shot at 30/50/70%, without fine-tuning, with plain
pruning, Intra-Fusion (paper preset) and Intra-Fusion (our defaults), each without data and with 8
training batches as ``calibration_data`` (linear compensation, the default; and the layer-wise refit).
The figure is the held-out loss in bits per byte (lower is better; the unpruned models' is the first row).

    python benchmarks/language_model.py              # 3 models
    python benchmarks/language_model.py --seeds 5
    python benchmarks/language_model.py --parts      # also MLP neurons and heads pruned on their own, without data
    python benchmarks/language_model.py --sweep      # also OTConfig.max_cost_without_bn varied, without data
    python benchmarks/language_model.py --compensate-merged   # only: OTConfig(compensate_merged=True) against our
                                                              # defaults and OT alone, without data
    python benchmarks/language_model.py --family gpt2   # a GPT-2 instead (GELU MLP, packed qkv heads)
    python benchmarks/language_model.py --family gpt2 --tied-width   # only: GPT-2's hidden width, which its
                                                                     # output layer shares with the input embedding
"""

from __future__ import annotations

import argparse
import copy
import glob
import math
import os
import platform
import sys
import sysconfig
from typing import Dict, List, Tuple

import torch
from torch.nn import functional as F

from lightning_intrafusion import OTConfig, prune
from pinned_training import load_or_train

CACHE = os.path.join(os.path.dirname(__file__), ".cache")
SPARSITIES = (0.3, 0.5, 0.7)
SEQUENCE = 128
# per family: the layers whose groups are pruned (MLP neurons, heads; the hidden width stays)
MLP_LAYERS = {"llama": "*.mlp.up_proj", "gpt2": "*.mlp.c_fc"}
HEAD_LAYERS = {"llama": "*.self_attn.q_proj", "gpt2": "*.attn.c_attn"}
METHODS = {"default": dict(method="default"), "if-paper": dict(ot_config=OTConfig.paper()), "if-ours": {}}
REPAIRS = {"no data": None, "+linear": "linear", "+refit": "refit"}


def stdlib_text() -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte streams of the standard library's top-level ``.py`` files, split by file."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if len(files) < 50:
        raise RuntimeError(f"expected the standard library's sources, found {len(files)} .py files")
    parts = {True: [], False: []}
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            parts[i % 8 == 7].append(f.read())
    def as_tensor(chunks):
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()

    return as_tensor(parts[False]), as_tensor(parts[True])


def scopes(family: str) -> Dict[str, Dict[str, List[str]]]:
    mlp, heads = MLP_LAYERS[family], HEAD_LAYERS[family]
    return {"MLP + heads": {"include": [mlp, heads]}, "MLP only": {"include": [mlp]}, "heads only": {"include": [heads]}}


def build(seed: int, family: str = "llama"):
    """A byte-level causal language model from a config: LLaMA (SwiGLU MLP, rotary positions, grouped key/value
    heads, RMSNorm, no biases) or GPT-2 (GELU MLP, learned positions, packed qkv in Conv1D layers, LayerNorm)."""
    import transformers

    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=256, n_positions=SEQUENCE, n_embd=128, n_layer=4, n_head=8,
                                         n_inner=512, bos_token_id=0, eos_token_id=0)  # bytes: no special tokens used
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=SEQUENCE, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def windows(stream: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - SEQUENCE, (count,), generator=generator)
    return torch.stack([stream[s:s + SEQUENCE] for s in starts.tolist()])


def train(model, text: torch.Tensor, seed: int, steps: int = 1500, batch: int = 32):
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        x = windows(text, batch, generator)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0:
            print(f"  seed {seed} step {step}: {loss.item() / math.log(2):.3f} bits per byte", flush=True)
    return model.eval()


def _cache_path(seed: int, family: str) -> str:
    return os.path.join(CACHE, f"{family}_stdlib_seed{seed}.pt")


def train_from_seed(seed: int, family: str):
    """The ``family`` model trained from seed ``seed`` on the standard library text; run by :func:`trained` in a
    pinned child process."""
    return train(build(seed, family), stdlib_text()[0], seed)


def trained(seed: int, family: str = "llama"):
    """The ``family`` model trained from seed ``seed``, cached on disk (trained reproducibly where missing:
    ``pinned_training.py``)."""
    return load_or_train(_cache_path(seed, family), build(seed, family), "language_model", "train_from_seed", seed, family)


@torch.no_grad()
def bits_per_byte(model, batches: List[torch.Tensor]) -> float:
    model.eval()
    total = 0.0
    for x in batches:
        logits = model(input_ids=x, use_cache=False).logits
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).item()
    return total / len(batches) / math.log(2)


def run_cell(model, sparsity, test, example, scope, method, data):
    """Prune a copy of ``model``; its held-out bits per byte and the report."""
    pruned = copy.deepcopy(model)
    report = prune(pruned, example, sparsity, **scope, **method, **data)
    return bits_per_byte(pruned, test), report


def merged_share(reports) -> str:
    """Share of the removed channels that were merged into a kept one (rather than dropped)."""
    merged = sum(g.merged for r in reports for g in r.groups)
    removed = sum(g.width_before - g.width_after for r in reports for g in r.groups)
    return f"{merged / max(removed, 1):.0%}"


def mean_std(values) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean():.3f} ±{t.std():.3f}" if len(values) > 1 else f"{t.mean():.3f}"


def paired(ours, theirs) -> str:
    """Mean per-model difference (ours - theirs; negative: ours is better), its standard error, and on how
    many models ours is at or below theirs."""
    d = torch.tensor(ours, dtype=torch.float64) - torch.tensor(theirs, dtype=torch.float64)
    se = d.std() / len(d) ** 0.5 if len(d) > 1 else torch.tensor(0.0)
    return f"{d.mean():+.3f} ±{se:.3f} ({int((d <= 0).sum())}/{len(d)})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3, help="independently trained models")
    parser.add_argument("--parts", action="store_true", help="also MLP neurons and heads on their own, without data")
    parser.add_argument("--compensate-merged", action="store_true",
                        help="instead of the main table: OTConfig(compensate_merged=True) vs our defaults, without data")
    parser.add_argument("--sweep", action="store_true", help="also max_cost_without_bn varied, without data")
    parser.add_argument("--family", choices=sorted(MLP_LAYERS), default="llama")
    parser.add_argument("--tied-width", action="store_true",
                        help="instead of the main table: the hidden width (GPT-2: tied to the output layer) on its own")
    args = parser.parse_args()
    if args.tied_width and args.family != "gpt2":
        parser.error("--tied-width needs --family gpt2 (the LLaMA here has untied embeddings)")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    train_text, test_text = stdlib_text()
    test = list(windows(test_text, 256, torch.Generator().manual_seed(1234)).split(32))
    calibration = list(windows(train_text, 256, torch.Generator().manual_seed(99)).split(32))  # 8 batches of 32
    example = {"input_ids": calibration[0][:2], "use_cache": False}
    print(f"command: python benchmarks/language_model.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Python {platform.python_version()} standard library text: "
          f"{len(train_text):,} train / {len(test_text):,} held-out bytes; held-out bits per byte (lower is better), "
          f"mean ±std over {args.seeds} models; 256 held-out windows of {SEQUENCE} bytes; {args.family}\n")
    models = [trained(seed, args.family) for seed in range(args.seeds)]
    scope = scopes(args.family)
    if args.tied_width:
        tied_width(models, test, example, calibration)
        return
    if args.compensate_merged:
        compensate_merged(models, test, example, scope)
        return
    print("| sparsity | method | " + " | ".join(REPAIRS) + " | merged (no data) | params | seconds (no data / +linear / +refit) |")
    print("|---|---|" + "---|" * len(REPAIRS) + "---|---|---|")
    print(f"| 0% | dense | {mean_std([bits_per_byte(m, test) for m in models])} |" + " |" * (len(REPAIRS) + 2))
    results = {}
    for s in SPARSITIES:
        for label, extra in METHODS.items():
            cells, seconds = [], []
            for repair, compensation in REPAIRS.items():
                data = {} if compensation is None else dict(calibration_data=calibration, compensation=compensation)
                runs = [run_cell(model, s, test, example, scope["MLP + heads"], extra, data) for model in models]
                results[s, label, repair] = [value for value, _ in runs]
                cells.append(mean_std(results[s, label, repair]))
                seconds.append(f"{sum(r.seconds for _, r in runs) / len(runs):.2f}")
                if compensation is None:
                    merged = merged_share([r for _, r in runs])
            print(f"| {s:.0%} | {label} | " + " | ".join(cells) + f" | {merged} | {runs[0][1].params_after:,} | "
                  f"{' / '.join(seconds)} |", flush=True)
    print("\nPaired per model (if-ours minus the rival, bits per byte; negative: if-ours better; in how many models at or below):\n")
    print("| sparsity | data | vs default | vs if-paper |")
    print("|---|---|---|---|")
    for s in SPARSITIES:
        for repair in REPAIRS:
            ours = results[s, "if-ours", repair]
            print(f"| {s:.0%} | {repair} | {paired(ours, results[s, 'default', repair])} | "
                  f"{paired(ours, results[s, 'if-paper', repair])} |")
    if args.parts:
        parts(models, test, example, scope)
    if args.sweep:
        sweep(models, test, example, scope)


def parts(models, test, example, scope) -> None:
    """MLP neurons and heads pruned on their own, without data: where fusion gains or loses."""
    print("\nEach kind of group on its own, without data (bits per byte, mean ±std; paired: if-ours minus default)\n")
    print("| groups | sparsity | default | if-paper | if-ours | merged (if-ours) | if-ours - default (paired) |")
    print("|---|---|---|---|---|---|---|")
    for scope_name in ("MLP only", "heads only"):
        for s in SPARSITIES:
            runs = {label: [run_cell(m, s, test, example, scope[scope_name], extra, {}) for m in models] for label, extra in METHODS.items()}
            values = {label: [v for v, _ in r] for label, r in runs.items()}
            print(f"| {scope_name} | {s:.0%} | {mean_std(values['default'])} | {mean_std(values['if-paper'])} | "
                  f"{mean_std(values['if-ours'])} | {merged_share([r for _, r in runs['if-ours']])} | "
                  f"{paired(values['if-ours'], values['default'])} |", flush=True)


# --compensate-merged: the data-free variants of Intra-Fusion compared, and plain pruning
VARIANTS = {
    "default": dict(method="default"),
    "OT alone": dict(ot_config=OTConfig(gaussian_compensation=False)),
    "if-ours": {},
    "compensate_merged": dict(ot_config=OTConfig(compensate_merged=True)),
}


def compensate_merged(models, test, example, scope) -> None:
    """Without data: our defaults (near-duplicates merged, the rest predicted from the kept neurons as they were),
    OT alone (merged within ``max_cost_without_bn``, no compensation) and ``compensate_merged`` (merged as OT
    alone, then every consumer's unpruned output predicted from the merged kept neurons)."""
    print("Without data (bits per byte, mean ±std; merged: share of removed channels merged; paired: "
          "compensate_merged minus if-ours)\n")
    print("| groups | sparsity | " + " | ".join(VARIANTS) + " | merged (compensate_merged) | paired | seconds (if-ours / compensate_merged) |")
    print("|---|---|" + "---|" * (len(VARIANTS) + 3))
    for scope_name in ("MLP + heads", "MLP only", "heads only"):
        for s in SPARSITIES:
            runs = {label: [run_cell(m, s, test, example, scope[scope_name], extra, {}) for m in models]
                    for label, extra in VARIANTS.items()}
            values = {label: [v for v, _ in r] for label, r in runs.items()}
            seconds = " / ".join(f"{sum(r.seconds for _, r in runs[label]) / len(models):.2f}" for label in ("if-ours", "compensate_merged"))
            print(f"| {scope_name} | {s:.0%} | " + " | ".join(mean_std(values[label]) for label in VARIANTS) + " | "
                  f"{merged_share([r for _, r in runs['compensate_merged']])} | "
                  f"{paired(values['compensate_merged'], values['if-ours'])} | {seconds} |", flush=True)


TIED_SPARSITIES = (0.1, 0.2, 0.3, 0.5)


def tied_width(models, test, example, calibration) -> None:
    """GPT-2's hidden width pruned on its own. Its output layer shares the input embedding: that tensor's
    columns are only removed (it cannot be averaged as an embedding and summed as an output layer), the
    group's other tensors (every block's projections, norms and position embeddings) are fused."""
    print("| sparsity | data | default | if-ours | merged (if-ours) | if-ours - default (paired) |")
    print("|---|---|---|---|---|---|")
    print(f"| 0% | | {mean_std([bits_per_byte(m, test) for m in models])} | | | |")
    scope = {"include": ["transformer.wte"]}
    for s in TIED_SPARSITIES:
        for repair, data in (("no data", {}), ("+linear", dict(calibration_data=calibration))):
            runs = {label: [run_cell(m, s, test, example, scope, METHODS[label], data) for m in models]
                    for label in ("default", "if-ours")}
            values = {label: [v for v, _ in r] for label, r in runs.items()}
            print(f"| {s:.0%} | {repair} | {mean_std(values['default'])} | {mean_std(values['if-ours'])} | "
                  f"{merged_share([r for _, r in runs['if-ours']])} | {paired(values['if-ours'], values['default'])} |",
                  flush=True)


SWEEP = (1.0, 1.1, 1.2, 1.3, 1.4, None)  # OTConfig.max_cost_without_bn (None: like BatchNorm groups)
SWEEP_COMPENSATED = (0.5, 0.7, 0.9, 1.1, 1.3)  # OTConfig.max_cost_without_bn_compensated


def sweep(models, test, example, scope) -> None:
    """Intra-Fusion without data with the distance within which a neuron is merged into a kept one varied:
    ``max_cost_without_bn`` without the Gaussian compensation, ``max_cost_without_bn_compensated`` with it (our
    defaults); heads have their own threshold."""
    for field, values, fixed in (("max_cost_without_bn", SWEEP, {"gaussian_compensation": False}),
                                 ("max_cost_without_bn_compensated", SWEEP_COMPENSATED, {})):
        settings = ", ".join(f"{k}={v}" for k, v in fixed.items()) or "our defaults"
        print(f"\nSweep of OTConfig.{field} without data ({settings}; bits per byte, mean over the models; "
              "in brackets: share of removed channels merged)\n")
        print("| groups | sparsity | default | " + " | ".join(f"{c}" for c in values) + " |")
        print("|---|---|---|" + "---|" * len(values))
        for scope_name in ("MLP + heads", "MLP only"):
            for s in SPARSITIES:
                plain = [run_cell(m, s, test, example, scope[scope_name], METHODS["default"], {})[0] for m in models]
                cells = []
                for c in values:
                    config = OTConfig(**fixed, **{field: c})
                    runs = [run_cell(m, s, test, example, scope[scope_name], dict(ot_config=config), {}) for m in models]
                    cells.append(f"{sum(v for v, _ in runs) / len(runs):.3f} ({merged_share([r for _, r in runs])})")
                print(f"| {scope_name} | {s:.0%} | {sum(plain) / len(plain):.3f} | " + " | ".join(cells) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
