"""Inference latency of pruned models: channels are physically removed, so a pruned model is a smaller
dense model, and runs faster with no sparse kernels. Dense and pruned copies are timed side by side in one
run, round-robin (every round times each model once), and the median per-batch time over the rounds is
reported with its ratio to the dense model's: these machines are noisy, and interleaving spreads the noise
over all models alike.

    python benchmarks/latency.py                 # CPU, torch's default thread count
    python benchmarks/latency.py --threads 1 --rounds 15

Intra-Fusion and plain pruning keep the same channels, so their pruned models have identical shapes and
the same latency: only Intra-Fusion's models are timed (the script checks the shapes agree).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from lightning_intrafusion import count_macs_and_params, prune
from lightning_intrafusion.models import SmallTransformer, SmallVGG, resnet18

SPARSITIES = (0.3, 0.5, 0.7)

# name, model factory, input factory (batch size -> inputs), batch sizes, prune() options
CASES: List[Tuple[str, Callable[[], nn.Module], Callable[[int], torch.Tensor], Tuple[int, ...], dict]] = [
    ("ResNet-18 (32x32)", resnet18, lambda b: torch.randn(b, 3, 32, 32), (1, 32), {}),
    ("Transformer 768/3072 x4", lambda: SmallTransformer(dim=768, heads=12, mlp=3072, depth=4),
     lambda b: torch.randn(b, 1, 8, 8), (1, 64), {"include": ["*.fc1", "*.attn.q"], "channel_blocks": {"*.attn.q": 64}}),
    ("VGG (digits)", lambda: SmallVGG(width=32), lambda b: torch.randn(b, 1, 8, 8), (256,), {}),
]


def per_batch_seconds(model: nn.Module, x: torch.Tensor, iterations: int) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(iterations):
            model(x)
        return (time.perf_counter() - start) / iterations


def time_side_by_side(models: Dict[str, nn.Module], x: torch.Tensor, rounds: int, budget: float) -> Dict[str, float]:
    """Median seconds per batch of each model, timed round-robin; each timing runs about ``budget`` seconds."""
    iterations = {}
    for name, model in models.items():  # warm-up, and how many iterations fill the budget
        per_batch_seconds(model, x, 2)
        iterations[name] = max(1, int(budget / max(per_batch_seconds(model, x, 3), 1e-6)))
    samples: Dict[str, List[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            samples[name].append(per_batch_seconds(model, x, iterations[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--budget", type=float, default=0.2, help="seconds per timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| model | batch | sparsity | params | MACs / sample | ms / batch | speed-up vs dense |")
    print("|---|---|---|---|---|---|---|")
    for name, factory, inputs, batches, options in CASES:
        torch.manual_seed(0)
        dense = factory().eval()
        example = inputs(2)
        models = {"dense": dense}
        for sparsity in SPARSITIES:
            fused, plain = copy.deepcopy(dense), copy.deepcopy(dense)
            prune(fused, example, sparsity, **options)
            prune(plain, example, sparsity, method="default", **options)
            shapes = [tuple(p.shape) for p in fused.parameters()]
            if shapes != [tuple(p.shape) for p in plain.parameters()]:
                raise RuntimeError(f"{name} at {sparsity:.0%}: fused and plain-pruned shapes differ")
            models[f"{sparsity:.0%}"] = fused.eval()
        for batch in batches:
            x = inputs(batch)
            seconds = time_side_by_side(models, x, args.rounds, args.budget)
            for label, model in models.items():
                macs, params = count_macs_and_params(model, x[:1])
                print(f"| {name} | {batch} | {'0% (dense)' if label == 'dense' else label} | {params:,} | {macs:,} | "
                      f"{seconds[label] * 1e3:.2f} | {seconds['dense'] / seconds[label]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
