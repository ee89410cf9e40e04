"""Train a small VGG on scikit-learn's digits and shrink it *while it trains* with
IntraFusionCallback: 0 -> 70% of channels removed over 4 events, every event logged.

    python examples/train_and_prune.py                    # CSV + W&B (offline) logs under ./runs
    python examples/train_and_prune.py --target 0.5 --events 1 3 5

W&B runs are written offline; `wandb sync runs/wandb/offline-run-*` uploads them (or set
WANDB_MODE=online with a logged-in account to stream live).
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.nn import functional as F

from lightning_intrafusion import IntraFusionCallback
from lightning_intrafusion.datasets import DigitsDataModule
from lightning_intrafusion.models import SmallVGG


class Classifier(pl.LightningModule):
    def __init__(self, width: int = 32, lr: float = 0.05, epochs: int = 14) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = SmallVGG(width=width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.hparams.epochs)}


def make_loggers(save_dir: str) -> list:
    loggers = [CSVLogger(save_dir, name="csv")]
    try:
        from lightning_intrafusion import wandb_logger

        os.environ.setdefault("WANDB_MODE", "offline")
        loggers.append(wandb_logger(project="lightning-intrafusion-example", save_dir=save_dir))
    except ImportError:
        print("wandb is not installed: logging to CSV only (pip install wandb)")
    return loggers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--target", type=float, default=0.7)
    parser.add_argument("--events", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--save-dir", default="runs")
    args = parser.parse_args()

    pl.seed_everything(0, workers=True)
    loggers = make_loggers(args.save_dir)
    pruning = IntraFusionCallback(target_sparsity=args.target, epochs=args.events, schedule="cubic",
                                  recalibrate_batches=8)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[pruning], logger=loggers, enable_checkpointing=False,
                         deterministic=True, log_every_n_steps=5)
    model = Classifier(epochs=args.epochs)
    dense = sum(p.numel() for p in model.parameters())
    trainer.fit(model, datamodule=DigitsDataModule())

    final = float(trainer.callback_metrics["val/acc"])
    params = sum(p.numel() for p in model.parameters())
    print(f"final: val accuracy {final:.1%} with {params:,} of {dense:,} parameters ({1 - params / dense:.0%} fewer)")
    print(f"plot: {os.path.join(loggers[0].log_dir, 'intrafusion_accuracy_vs_sparsity.png')}")
    if len(loggers) > 1:
        loggers[1].experiment.finish()
        print(f"W&B run saved offline under {args.save_dir}/wandb; upload with: wandb sync {args.save_dir}/wandb/offline-run-*")


if __name__ == "__main__":
    main()
