"""Train a small VGG on scikit-learn's digits with Lightning, prune it one-shot with Intra-Fusion
(and, for comparison, plain pruning of the same channels), fine-tune briefly, and log everything.

    python examples/train_and_prune.py                 # logs to CSV and to W&B offline (if installed)
    python examples/train_and_prune.py --sparsity 0.7

W&B runs are written offline to ./runs/wandb; `wandb sync runs/wandb/offline-run-*` uploads them.
"""

from __future__ import annotations

import argparse
import copy
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.nn import functional as F

from lightning_intrafusion import prune
from lightning_intrafusion.datasets import DigitsDataModule
from lightning_intrafusion.models import SmallVGG


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = SmallVGG(width=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    hits = total = 0
    for x, y in loader:
        hits += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * hits / total


def loggers(save_dir: str):
    out = [CSVLogger(save_dir, name="csv")]
    try:
        import wandb  # noqa: F401
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", "offline")
        out.append(WandbLogger(project="lightning-intrafusion-example", save_dir=save_dir))
    except ImportError:
        print("wandb is not installed: logging to CSV only (pip install wandb)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--save-dir", default="runs")
    args = parser.parse_args()

    pl.seed_everything(0, workers=True)
    data = DigitsDataModule()
    data.setup()
    model = Classifier()
    run_loggers = loggers(args.save_dir)
    trainer = pl.Trainer(max_epochs=args.epochs, logger=run_loggers, enable_checkpointing=False,
                         deterministic=True, log_every_n_steps=5)
    trainer.fit(model, datamodule=data)

    val = data.val_dataloader()
    example = next(iter(val))[0][:8]
    acc_dense = accuracy(model, val)
    plain = copy.deepcopy(model)
    prune(plain.net, example, args.sparsity, method="default")
    report = prune(model.net, example, args.sparsity)  # Intra-Fusion, data-free
    acc_fused, acc_plain = accuracy(model, val), accuracy(plain, val)
    print(report)
    print(f"accuracy: dense {acc_dense:.1f}%  |  after Intra-Fusion {acc_fused:.1f}%  |  "
          f"after plain pruning {acc_plain:.1f}%  (no fine-tuning)")
    metrics = {"intrafusion/sparsity": report.achieved_sparsity, "intrafusion/acc_pre": acc_dense,
               "intrafusion/acc_post": acc_fused, "intrafusion/acc_post_default": acc_plain,
               "intrafusion/params": report.params_after, "intrafusion/macs": report.macs_after,
               "intrafusion/seconds": report.seconds}
    for logger in run_loggers:
        logger.log_metrics(metrics, step=trainer.global_step)

    finetune = pl.Trainer(max_epochs=args.finetune_epochs, logger=run_loggers, enable_checkpointing=False,
                          deterministic=True, log_every_n_steps=5)
    finetune.fit(model, datamodule=data)  # a fresh Trainer builds optimizers for the new parameters
    print(f"after {args.finetune_epochs} fine-tuning epochs: {accuracy(model, val):.1f}% "
          f"with {report.params_after:,} of {report.params_before:,} parameters")
    for logger in run_loggers:
        logger.finalize("success")
    if len(run_loggers) > 1:
        import wandb

        wandb.finish()
        print(f"W&B run saved offline under {args.save_dir}/wandb; upload with: wandb sync {args.save_dir}/wandb/offline-run-*")


if __name__ == "__main__":
    main()
