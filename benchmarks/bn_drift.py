"""Why data-free one-shot pruning of BatchNorm nets loses accuracy: after pruning, how far each BN's
input statistics fall from its running statistics (measured on training digits), per method.

    python benchmarks/bn_drift.py                       # small ResNet, 30%
    python benchmarks/bn_drift.py --model vgg --sparsity 0.5

Two tables, each cell a mean over the 5 cached models of ``benchmarks/oneshot.py``:
1. running statistics: median over channels of (input variance / running variance); 1.0 means the
   running variance describes the inputs (what re-estimating the statistics would restore). Channels
   that Intra-Fusion merged are re-parameterised so that eval mode computes the folded merge whatever
   this ratio, so for them it describes train-mode consistency only.
2. signal: mean BN output variance (eval mode) relative to the unpruned model's, i.e. how much of the
   signal each layer passes on; it falls layer after layer when pruning shrinks it.
Last rows: mean |mean shift| (in running std) over all BNs, and test accuracy.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch.utils.data import DataLoader

from lightning_intrafusion import batchnorm_drift, prune
from lightning_intrafusion.datasets import digits_tensors

sys.path.insert(0, os.path.dirname(__file__))
from oneshot import MODELS, accuracy, trained, variants  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet", choices=["resnet", "vgg"])
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    train_set, test_set = digits_tensors()
    batches = [b[0] for b in DataLoader(train_set, batch_size=64, shuffle=False)][:8]
    models = [trained(args.model, seed) for seed in range(args.seeds)]
    methods = {"unpruned": None, **variants(1.0, has_batchnorm=True)}
    methods = {label: extra for label, extra in methods.items() if label != "if-ours"} | {"if-ours": methods["if-ours"]}
    ratios, signal, shifts, accs = {}, {}, {}, {}
    reference = [batchnorm_drift(model, batches) for model in models]
    for label, extra in methods.items():
        per_model, per_model_signal, model_shifts, model_accs = [], [], [], []
        for model, dense in zip(models, reference):
            pruned = copy.deepcopy(model)
            if extra is not None:
                prune(pruned, test_set.tensors[0][:8], args.sparsity, **MODELS[args.model][1], **extra)
            drift = batchnorm_drift(pruned, batches)
            per_model.append({name: d.variance_ratio.median().item() for name, d in drift.items()})
            per_model_signal.append({name: (d.output_variance.mean() / dense[name].output_variance.mean()).item()
                                     for name, d in drift.items()})
            model_shifts.append(torch.cat([d.mean_shift.abs() for d in drift.values()]).mean().item())
            model_accs.append(accuracy(pruned, test_set))
        ratios[label] = {name: sum(m[name] for m in per_model) / len(per_model) for name in per_model[0]}
        signal[label] = {name: sum(m[name] for m in per_model_signal) / len(per_model) for name in per_model[0]}
        shifts[label] = sum(model_shifts) / len(model_shifts)
        accs[label] = sum(model_accs) / len(model_accs)
    labels = list(methods)
    print(f"command: python benchmarks/bn_drift.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{args.model}, {args.sparsity:.0%} one-shot, no data; statistics measured on {len(batches)} training batches; "
          f"mean over {len(models)} models")
    for title, table in (("input variance / running variance (median over channels)", ratios),
                         ("BN output variance relative to the unpruned model", signal)):
        print(f"\n{title}\n")
        print("| BatchNorm | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        for name in ratios["unpruned"]:
            print(f"| {name} | " + " | ".join(f"{table[label][name]:.2f}" for label in labels) + " |")
    print("\n| all BNs | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    print("| mean abs. mean shift | " + " | ".join(f"{shifts[label]:.2f}" for label in labels) + " |")
    print("| test accuracy | " + " | ".join(f"{accs[label]:.1f}" for label in labels) + " |")

if __name__ == "__main__":
    main()
