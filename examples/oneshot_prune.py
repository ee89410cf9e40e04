"""One-shot, data-free pruning of a trained network: train a small ResNet on scikit-learn's digits, then
remove 30/50/70% of the channels of every layer group without any data and without fine-tuning, with
plain pruning and with Intra-Fusion, and with BatchNorm statistics re-estimated on inputs distilled
from the network itself (still no data).

    python examples/oneshot_prune.py
    python examples/oneshot_prune.py --sparsity 0.4 --epochs 10
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.nn import functional as F

from lightning_intrafusion import prune
from lightning_intrafusion.datasets import digits_tensors
from lightning_intrafusion.models import SmallResNet


def train(epochs: int, seed: int = 0) -> torch.nn.Module:
    train_set, _ = digits_tensors()
    torch.manual_seed(seed)
    model = SmallResNet(width=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    x, y = train_set.tensors
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module) -> float:
    _, test_set = digits_tensors()
    x, y = test_set.tensors
    return 100.0 * (model.eval()(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    model = train(args.epochs)
    example = torch.zeros(1, 1, 8, 8)  # only its shape matters: no data is used below
    print(f"dense: accuracy {accuracy(model):.1f}%, {sum(p.numel() for p in model.parameters()):,} parameters\n")
    methods = {
        "plain pruning": dict(method="default"),
        "intra-fusion": dict(method="intrafusion"),
        "plain pruning + synthetic BN": dict(method="default", calibration_data="synthetic"),
        "intra-fusion + synthetic BN": dict(method="intrafusion", calibration_data="synthetic"),
    }
    print(f"{'sparsity':>8}  {'method':30s}  {'accuracy':>8}  {'params':>8}  {'MACs':>9}  seconds")
    for sparsity in args.sparsity:
        for label, options in methods.items():
            pruned = copy.deepcopy(model)
            report = prune(pruned, example, sparsity, **options)
            print(f"{sparsity:8.0%}  {label:30s}  {accuracy(pruned):7.1f}%  {report.params_after:8,}  "
                  f"{report.macs_after:9,}  {report.seconds:.2f}")


if __name__ == "__main__":
    main()
