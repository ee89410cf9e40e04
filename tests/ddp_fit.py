"""Run by test_callback_ddp.py: a 2-process CPU DDP fit (Lightning re-launches this script per rank)."""

import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, os.path.dirname(__file__))
from lit import LitClassifier  # noqa: E402

from lightning_intrafusion import IntraFusionCallback  # noqa: E402
from lightning_intrafusion.datasets import DigitsDataModule  # noqa: E402


class RanksAgree(Callback):
    """At the end of fit, every rank checks that all ranks hold the same architecture and weights."""

    def on_fit_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        stats = torch.stack([torch.tensor(float(flat.numel())), flat.double().sum().float(), flat.abs().sum()])
        gathered = trainer.strategy.all_gather(stats)
        assert gathered.shape[0] == 2, gathered.shape
        assert torch.allclose(gathered[0], gathered[1], rtol=0, atol=1e-4), gathered
        assert flat.numel() < 25_000, flat.numel()
        print(f"RANK {trainer.global_rank} OK params={flat.numel()} fired={trainer.callbacks[0].fired} "
              f"val_acc={float(trainer.callback_metrics['val_acc']):.3f}", flush=True)


if __name__ == "__main__":
    pl.seed_everything(0)
    # with "calibrate": each rank re-estimates BN statistics and compensates means on its own batches;
    # the re-wrapped DDP module must still start every rank from the same weights
    calibrate = dict(recalibrate_batches=2, compensation="linear") if "calibrate" in sys.argv[2:] else {}
    cb = IntraFusionCallback(target_sparsity=0.5, start=1, end=2, schedule="linear", **calibrate)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, logger=False,
                         callbacks=[cb, RanksAgree()], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=sys.argv[1])
    trainer.fit(LitClassifier(), datamodule=DigitsDataModule())
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's background threads can abort the interpreter's normal shutdown
