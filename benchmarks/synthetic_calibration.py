"""How many optimisation steps and samples data-free calibration needs: inputs distilled from each
unpruned model's BN statistics (`synthesize_inputs`), passed as `calibration_data` to a pruning step
(Intra-Fusion, our defaults: removed channels predicted from the kept ones by least squares and BN statistics re-estimated on
them), against no calibration and calibration on 8 real training batches.

    python benchmarks/synthetic_calibration.py          # the 10 cached models of benchmarks/oneshot.py
    python benchmarks/synthetic_calibration.py --seeds 2

Accuracy in % on the held-out digits, mean over the models; seconds: distillation time per model.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch.utils.data import DataLoader

from lightning_intrafusion import prune, synthesize_inputs
from lightning_intrafusion.datasets import digits_tensors

sys.path.insert(0, os.path.dirname(__file__))
from oneshot import EXTRA, MODELS, accuracy, trained  # noqa: E402

SETTINGS = ((25, 64), (50, 64), (100, 64), (200, 64), (400, 64), (200, 32), (200, 128))  # (steps, samples)
SPARSITIES = (0.3, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    MODELS.update(EXTRA)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    train_set, test_set = digits_tensors()
    example = test_set.tensors[0][:8]
    real = [b[0] for b in DataLoader(train_set, batch_size=64, shuffle=False)][:8]
    print(f"command: python benchmarks/synthetic_calibration.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Intra-Fusion (our defaults), mean over "
          f"{args.seeds} models\n")
    header = " | ".join(f"{s:.0%}" for s in SPARSITIES)
    print(f"| model | calibration data | {header} | seconds |")
    print("|---|---|" + "---|" * len(SPARSITIES) + "---|")
    for name in ("vgg", "resnet", "mobilenet"):
        models = [trained(name, seed) for seed in range(args.seeds)]

        def row(label: str, batches_per_model, seconds: str = "") -> None:
            cells = []
            for s in SPARSITIES:
                accs = []
                for model, batches in zip(models, batches_per_model):
                    pruned = copy.deepcopy(model)
                    prune(pruned, example, s, calibration_data=batches)
                    accs.append(accuracy(pruned, test_set))
                cells.append(f"{sum(accs) / len(accs):.1f}")
            print(f"| {name} | {label} | " + " | ".join(cells) + f" | {seconds} |")

        row("none", [None] * len(models))
        for steps, samples in SETTINGS:
            start = time.perf_counter()
            distilled = [synthesize_inputs(m, example, num_samples=samples, steps=steps) for m in models]
            seconds = (time.perf_counter() - start) / len(models)
            row(f"synthetic, {steps} steps, {samples} samples", distilled, f"{seconds:.2f}")
        row("8 real training batches", [real] * len(models))


if __name__ == "__main__":
    main()
