"""Prune while training on digits with IntraFusionCallback: 0 -> 70% over 4 events, from scratch,
with the default (cubic, AGP) schedule and with a linear one.

    python benchmarks/during_training.py                       # SmallVGG, 5 seeds
    python benchmarks/during_training.py --arch transformer    # nn.MultiheadAttention transformer (heads, MLP)
    python benchmarks/during_training.py --seeds 1

Runs (per seed, same data): dense; Intra-Fusion; default pruning; with 8 recent training batches as
calibration data (``recalibrate_batches=8``): on the VGG, Intra-Fusion with BN statistics re-estimated, without
compensation, with mean or linear compensation of removed channels and with the layer-wise refit
(``compensation=``); on the transformer (no BN), Intra-Fusion with mean and with linear compensation and with
the refit, and default pruning with linear compensation.
Prints accuracy right after each event and final accuracy (means over seeds), params/MACs and the
time the callback added.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn import functional as F

from lightning_intrafusion import IntraFusionCallback, count_macs_and_params
from lightning_intrafusion.datasets import DigitsDataModule
from lightning_intrafusion.models import SmallTransformer, SmallVGG

EPOCHS = 14
EVENTS = dict(start=2, end=8, every=2)  # 4 events: epochs 2, 4, 6, 8
ARCHS = {  # network, optimizer, what the callback prunes
    "vgg": (lambda: SmallVGG(width=32), "sgd", {}),
    "transformer": (lambda: SmallTransformer(dim=64, heads=4, mlp=128, attention="torch"), "adamw",
                    {"include": ["*.attn", "*.fc1"]}),
}
ARCH = "vgg"


class Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = ARCHS[ARCH][0]()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        if ARCHS[ARCH][1] == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=1e-4)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)}


class StepTimer(Callback):
    """Wall time of every training step (batch start to batch end), per epoch. Placed first in the
    callback list; with a :class:`StepTimerEnd` placed last, the other callbacks' hooks are inside."""

    def __init__(self) -> None:
        self.times = {}
        self.closed_by_end = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.closed_by_end:
            self.stop(trainer)

    def stop(self, trainer):
        self.times.setdefault(trainer.current_epoch, []).append(time.perf_counter() - self._t)


class StepTimerEnd(Callback):
    """Stops a :class:`StepTimer` after every other callback's batch-end hook ran."""

    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer
        timer.closed_by_end = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.timer.stop(trainer)


def run(callback, seed: int = 0):
    pl.seed_everything(seed, workers=True, verbose=False)
    model = Lit()
    timer = StepTimer()
    callbacks = [callback, timer] if callback is not None else [timer]
    trainer = pl.Trainer(max_epochs=EPOCHS, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    start = time.perf_counter()
    trainer.fit(model, datamodule=DigitsDataModule())
    total = time.perf_counter() - start
    macs, params = count_macs_and_params(model.net, torch.zeros(1, 1, 8, 8))
    return float(trainer.callback_metrics["val_acc"]) * 100, params, macs, total, timer, callback


def mean(values) -> float:
    return sum(values) / len(values)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5, help="training runs (seeds) per configuration")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="vgg")
    parser.add_argument("--no-overhead", action="store_true", help="skip the step-time measurement")
    args = parser.parse_args()
    global ARCH
    ARCH = args.arch
    scope = ARCHS[ARCH][2]
    net = {"vgg": "SmallVGG(width=32), SGD", "transformer": "SmallTransformer(dim=64, heads=4, mlp=128, "
           "nn.MultiheadAttention), AdamW; heads and MLP neurons pruned"}[ARCH]
    seeds = range(args.seeds)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # one table, not a log per fit
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"command: python benchmarks/during_training.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {net} on digits, "
          f"{EPOCHS} epochs, events at epochs 2,4,6,8, target 70%; accuracies are means over {args.seeds} seeds\n")
    dense = [run(None, seed) for seed in seeds]
    print(f"dense: final acc {mean([d[0] for d in dense]):.1f}, params {dense[0][1]:,}, MACs {dense[0][2]:,}\n")
    for schedule in ("cubic", "linear"):
        configs = {
            "intra-fusion": dict(),
            "default": dict(method="default"),
        }
        calibrated = dict(recalibrate_batches=8, compare_default=False)
        if ARCH == "vgg":
            configs["intra-fusion + BN re-estimation"] = calibrated
            configs["intra-fusion + BN re-estimation + mean compensation"] = dict(calibrated, compensation="mean")
            configs["intra-fusion + BN re-estimation + linear compensation"] = dict(calibrated, compensation="linear")
            configs["intra-fusion + BN re-estimation + layer-wise refit"] = dict(calibrated, compensation="refit")
        else:  # no BN statistics to re-estimate: calibration data only serve compensation
            configs["intra-fusion + mean compensation"] = dict(calibrated, compensation="mean")
            configs["intra-fusion + linear compensation"] = dict(calibrated, compensation="linear")
            configs["default + linear compensation"] = dict(calibrated, method="default", compensation="linear")
            configs["intra-fusion + layer-wise refit"] = dict(calibrated, compensation="refit")
        results = {name: [run(IntraFusionCallback(0.7, schedule=schedule, verbose=False, **EVENTS, **scope, **kw), seed)
                          for seed in seeds] for name, kw in configs.items()}
        sparsities = " / ".join(f"{100 * r['achieved_sparsity']:.0f}%" for r in results["default"][0][5].records)
        print(f"schedule {schedule} (sparsity after each event: {sparsities})\n")
        print("| run | acc after event 1 / 2 / 3 / 4 | final acc | params | MACs | callback seconds |")
        print("|---|---|---|---|---|---|")
        after = {}
        for name, runs in results.items():
            key = "acc_post_recalibrated" if "+" in name else "acc_post"
            after[name] = [mean([100 * r[5].records[e][key] for r in runs]) for e in range(4)]
            spent = mean([sum(rec["seconds"] for rec in r[5].records) for r in runs])  # includes the comparisons
            print(f"| {name} | {' / '.join(f'{a:.1f}' for a in after[name])} | {mean([r[0] for r in runs]):.1f} | "
                  f"{runs[0][1]:,} | {runs[0][2]:,} | {spent:.2f} |")
            if name == "intra-fusion":
                after["same"] = [mean([100 * r[5].records[e]["acc_post_default"] for r in runs]) for e in range(4)]
                print(f"| (same network, plain pruning of the same channels) | "
                      f"{' / '.join(f'{a:.1f}' for a in after['same'])} | | | | |")
        for rival, label in (("same", "plain pruning of the same network"), ("default", "the default-pruning runs")):
            wins = sum(a > b for a, b in zip(after["intra-fusion"], after[rival]))
            print(f"\nintra-fusion above {label} right after {wins}/4 events")
        print()
    if not args.no_overhead:
        overhead()


def overhead(repeats: int = 21, epochs: int = 4) -> None:
    """Training-step time with and without a callback that never fires. Runs come in pairs (which goes
    first alternates), and the ratio is the median over pairs of the two runs' median step times, so
    slow drifts of the machine cancel. A step is timed from before the first callback's batch-start
    hook to after the last callback's batch-end hook. The time spent inside the callback's own hooks
    is measured too."""
    import statistics

    ratios, steps, hook_seconds = [], {"without": [], "with": []}, []
    for i in range(repeats):
        pair = {}
        for label in (("without", "with") if i % 2 == 0 else ("with", "without")):
            timer = StepTimer()
            cb = []
            if label == "with":
                cb = [IntraFusionCallback(0.5, unit="step", start=10**9, evaluate=False)]
                _time_hooks(cb[0], hook_seconds)
            pl.seed_everything(0, verbose=False)
            trainer = pl.Trainer(max_epochs=epochs, callbacks=[timer] + cb + [StepTimerEnd(timer)], logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 num_sanity_val_steps=0, limit_val_batches=0)
            trainer.fit(Lit(), datamodule=DigitsDataModule())
            pair[label] = statistics.median([x for epoch in timer.times.values() for x in epoch])
            steps[label].append(pair[label])
        ratios.append(pair["with"] / pair["without"])
    a, b = statistics.median(steps["without"]), statistics.median(steps["with"])
    per_step = sum(hook_seconds) / max(1, len(hook_seconds))
    print(f"\nsteps where nothing fires, {repeats} pairs of {epochs}-epoch runs: median step time without callback "
          f"{1e3 * a:.2f} ms, with {1e3 * b:.2f} ms; median paired ratio {statistics.median(ratios):.3f}. "
          f"Time inside the callback's hooks: {1e6 * per_step:.1f} us per step ({100 * per_step / a:.2f}% of a step)")


def _time_hooks(callback: Callback, seconds: list) -> None:
    """Wrap the callback's per-batch hook so that the time spent in it is recorded."""
    hook = callback.on_train_batch_start

    def timed(*args, **kwargs):
        t = time.perf_counter()
        hook(*args, **kwargs)
        seconds.append(time.perf_counter() - t)

    callback.on_train_batch_start = timed


if __name__ == "__main__":
    main()
