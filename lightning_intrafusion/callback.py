"""IntraFusionCallback: shrink a LightningModule while it trains, on an iterative sparsity schedule.

Thin Lightning glue: decides *when* (triggers, schedule), measures before/after, calls
:func:`~lightning_intrafusion.prune`, rebuilds optimizers around the new parameters and keeps the
pruning history in checkpoints. No OT and no graph code here.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_intrafusion.checkpoint import HISTORY_KEY
from lightning_intrafusion.compensation import COMPENSATIONS
from lightning_intrafusion.evaluation import evaluate, split_batch, to_device
from lightning_intrafusion.execution import eval_forward
from lightning_intrafusion.importance import ImportanceLike
from lightning_intrafusion.optimizers import restore_optimizer_state, snapshot_optimizer_state
from lightning_intrafusion.ot import OTConfig
from lightning_intrafusion.pruner import prune
from lightning_intrafusion.schedule import ScheduleFn, SparsitySchedule, check_monotone, resolve_schedule
from lightning_intrafusion.surgery import replay_history
from lightning_intrafusion.tracking import PruningTracker


class IntraFusionCallback(Callback):
    """Prune-and-fuse the model at configured epochs or optimizer steps.

    Args:
        target_sparsity: final fraction of channels removed from every pruned group, in ``[0, 1)``.
        start / end / every: events at ``start, start + every, ..., end`` (epochs, or optimizer steps
            with ``unit="step"``); ``end`` defaults to ``start`` (one event).
        epochs: an explicit list of event epochs/steps instead of start/end/every.
        unit: ``"epoch"`` (fire before the first batch of the epoch) or ``"step"`` (fire before the
            batch that follows that many optimizer steps). Always between optimizer steps.
        schedule: ``"cubic"`` (AGP, default), ``"linear"``, ``"exponential"``, ``"constant"``,
            a ``{event: sparsity}`` mapping, or a callable ``(event, num_events) -> sparsity``.
            Sparsities are cumulative, relative to the original widths.
        method: ``"intrafusion"`` or ``"default"`` (plain pruning).
        importance / ot_config / include / exclude / channel_blocks / on_unsupported: passed to
            :func:`prune` (``on_unsupported="skip"`` prunes what can be pruned exactly and leaves the rest).
        compare_default: also measure plain pruning of the same channels (on a copy) at each event.
        recalibrate_batches: if > 0, the step uses that many recent training batches as :func:`prune`'s
            ``calibration_data``: BatchNorm statistics are re-estimated on them. ``acc_post`` is then the same
            step without data, measured on a copy, and ``acc_post_recalibrated`` the model after the step.
            The default ``OTConfig(solver="auto")`` takes Sinkhorn plans on models with BatchNorm
            (see :meth:`OTConfig.resolved`).
        compensation: how the contribution of removed channels is kept, as in :func:`prune`: ``"refit"``,
            ``"linear"``, ``"mean"`` or ``"none"`` (default here, also for data-free steps, which otherwise
            compensate on modelled inputs, ``OTConfig.gaussian_compensation``; ``prune()`` defaults to
            ``"linear"``). With ``recalibrate_batches``, on those batches. Measured during training
            (``benchmarks/during_training.py``): linear compensation lifts accuracy right after events (VGG: up to
            +4.1 points) but the transformer ended 1.8-2.2 points lower after training on, and mean compensation
            cost it 8-12 points right after two events: a repair fitted to a network far from converged is a poor
            guide for what training does next. ``"refit"`` was the best on the VGG after every event and at the end,
            but ended the transformer 1.5-2.2 points lower, and keeps the pruned layers' outputs on the recent
            batches in memory.
        metric: a torchmetrics metric for the evaluations (default: top-1 multiclass accuracy; the
            number of classes is read from the model's output).
        evaluate: measure the metric around each event (needs validation data).
        batch_to_inputs: ``fn(batch) -> (inputs, target)``; default handles ``(x, y)`` and dicts.
    """

    def __init__(
        self,
        target_sparsity: float,
        start: int = 1,
        end: Optional[int] = None,
        every: int = 1,
        epochs: Optional[Sequence[int]] = None,
        unit: str = "epoch",
        schedule: Union[str, SparsitySchedule, Mapping[int, float], ScheduleFn] = "cubic",
        method: str = "intrafusion",
        importance: ImportanceLike = "l1",
        ot_config: Optional[OTConfig] = None,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        channel_blocks: Optional[Mapping[str, int]] = None,
        on_unsupported: str = "raise",
        compare_default: bool = True,
        recalibrate_batches: int = 0,
        compensation: str = "none",
        metric: Optional[Metric] = None,
        evaluate: bool = True,
        batch_to_inputs: Optional[Callable[[Any], Any]] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(target_sparsity, (int, float)) or not 0.0 <= float(target_sparsity) < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity!r}")
        if unit not in ("epoch", "step"):
            raise ValueError(f"unit must be 'epoch' or 'step', got {unit!r}")
        if method not in ("intrafusion", "default"):
            raise ValueError(f"Unknown method {method!r}; expected 'intrafusion' or 'default'")
        if on_unsupported not in ("raise", "skip"):
            raise ValueError(f"on_unsupported must be 'raise' or 'skip', got {on_unsupported!r}")
        if recalibrate_batches < 0:
            raise ValueError(f"recalibrate_batches must be >= 0, got {recalibrate_batches}")
        self.events = self._event_points(start, end, every, epochs)
        self.target_sparsity = float(target_sparsity)
        self.unit = unit
        self.schedule = resolve_schedule(schedule, self.target_sparsity)
        self.sparsities = check_monotone(self.schedule, len(self.events))
        if ot_config is not None and not isinstance(ot_config, OTConfig):
            raise TypeError(f"ot_config must be an OTConfig, got {type(ot_config).__name__}")
        ot_config = ot_config or OTConfig()  # solver="auto" is resolved by each step, which sees the model
        self.method = method
        self.prune_kwargs = dict(importance=importance, ot_config=ot_config, include=include, exclude=exclude,
                                 channel_blocks=channel_blocks, on_unsupported=on_unsupported)
        self.compare_default = compare_default
        self.recalibrate_batches = int(recalibrate_batches)
        if compensation not in COMPENSATIONS:
            raise ValueError(f"Unknown compensation {compensation!r}; expected one of {list(COMPENSATIONS)}")
        self.compensation = compensation
        self.metric = metric
        self.evaluate = evaluate
        self.split = batch_to_inputs or split_batch
        self.verbose = verbose
        # state saved in checkpoints
        self.fired = 0
        self.history: List[List[Any]] = []
        self.reference_widths: Dict[str, int] = {}
        self.records: List[Dict[str, float]] = []
        self._recent: Deque[Any] = deque(maxlen=max(1, self.recalibrate_batches))
        self._hook = None
        self._metric: Optional[Metric] = None  # top-1 accuracy, sized on the first validation batch
        self.tracker = PruningTracker(self.settings())

    def settings(self) -> Dict[str, Any]:
        """The callback's configuration as plain values (recorded in the logger's run config)."""
        ot = self.prune_kwargs["ot_config"]
        return {"target_sparsity": self.target_sparsity, "events": list(self.events), "unit": self.unit,
                "schedule": getattr(self.schedule, "__name__", repr(self.schedule)),
                "sparsities": list(self.sparsities), "method": self.method,
                "importance": str(self.prune_kwargs["importance"]), "ot_config": ot.to_dict(),
                "include": self.prune_kwargs["include"], "exclude": self.prune_kwargs["exclude"],
                "on_unsupported": self.prune_kwargs["on_unsupported"], "compare_default": self.compare_default,
                "recalibrate_batches": self.recalibrate_batches, "compensation": self.compensation}

    @staticmethod
    def _event_points(start: int, end: Optional[int], every: int, epochs: Optional[Sequence[int]]) -> List[int]:
        if epochs is not None:
            points = sorted({int(e) for e in epochs})
            if not points or points[0] < 0:
                raise ValueError(f"epochs must be a non-empty list of non-negative integers, got {epochs!r}")
            return points
        end = start if end is None else end
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if end < start:
            raise ValueError(f"end ({end}) is before start ({start})")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        return list(range(start, end + 1, every))

    # ------------------------------------------------------------------ setup and validation
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in ("FSDP", "DeepSpeed")):
            raise RuntimeError(f"IntraFusionCallback cannot prune under {strategy}: parameters are sharded. "
                               "Use a single device or strategy='ddp'.")
        for cb in trainer.callbacks:
            if type(cb).__name__ in ("StochasticWeightAveraging", "WeightAveraging", "EMAWeightAveraging"):
                raise RuntimeError(f"{type(cb).__name__} keeps a full-size copy of the model, which cannot follow "
                                   "structured pruning; remove it or apply it after pruning has finished.")
        if self.unit == "epoch" and trainer.max_epochs not in (None, -1) and self.events[-1] >= trainer.max_epochs:
            raise ValueError(f"pruning event at epoch {self.events[-1]} is past max_epochs={trainer.max_epochs} "
                             "(epochs count from 0)")
        if self.unit == "step" and trainer.max_steps not in (None, -1) and self.events[-1] >= trainer.max_steps:
            raise ValueError(f"pruning event at step {self.events[-1]} is past max_steps={trainer.max_steps}")
        if self._hook is None:
            self._hook = pl_module._register_load_state_dict_pre_hook(self._rebuild_before_load, with_module=True)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.evaluate and self._val_batches(trainer) is None:
            raise ValueError("IntraFusionCallback(evaluate=True) needs validation data: pass val_dataloaders "
                             "or a datamodule with val_dataloader(), or set evaluate=False")

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.verbose and trainer.is_global_zero and self.records:
            _print(trainer, "[IntraFusion] pruning events:\n" + self.tracker.text_table(self.unit))

    # ------------------------------------------------------------------ triggers
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        inputs, _ = self.split(batch)
        self._recent.append(inputs)
        if self.fired >= len(self.events):
            return
        due = self.events[self.fired]
        now = trainer.current_epoch if self.unit == "epoch" else trainer.global_step
        if now >= due:
            self._fire(trainer, pl_module, inputs)

    # ------------------------------------------------------------------ one event
    def _fire(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", inputs: Any) -> None:
        index = self.fired
        sparsity = self.sparsities[index]
        started = time.perf_counter()
        example = inputs[:2] if isinstance(inputs, torch.Tensor) else inputs  # tuple/dict inputs are used whole
        record: Dict[str, float] = {"event": float(index), "sparsity": sparsity}
        calibration = list(self._recent) if self.recalibrate_batches else None
        if self.evaluate:
            record["acc_pre"] = self._measure(trainer, pl_module)
            if self.compare_default and self.method != "default":
                record["acc_post_default"] = self._measure_pruned_copy(trainer, pl_module, example, sparsity, "default")
            if calibration is not None:  # the same step without data: what fusion alone gives
                record["acc_post"] = self._measure_pruned_copy(trainer, pl_module, example, sparsity, self.method)
        optimizer_state = snapshot_optimizer_state(trainer.optimizers, pl_module)
        learning_rates = [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]
        scheduler_states = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]

        report = prune(pl_module, example, sparsity, method=self.method, reference_widths=self.reference_widths or None,
                       calibration_data=calibration, compensation=self.compensation, **self.prune_kwargs)
        if not self.reference_widths:
            self.reference_widths = {g.name: g.width_before for g in report.groups}
        self.history.append(report.removals)
        self.fired += 1
        self._rebuild_optimizers(trainer, pl_module, optimizer_state, learning_rates, scheduler_states, report.removals)

        if self.evaluate:
            record["acc_post" if calibration is None else "acc_post_recalibrated"] = self._measure(trainer, pl_module)
        original = sum(self.reference_widths.get(g.name, g.width_before) for g in report.groups)
        reached = 1.0 - sum(g.width_after for g in report.groups) / original if original else 0.0
        record.update(params=float(report.params_after), macs=float(report.macs_after),
                      achieved_sparsity=reached, seconds=time.perf_counter() - started)
        if index == 0:
            record.update(params_before=float(report.params_before), macs_before=float(report.macs_before))
        self.records.append(record)
        self.tracker.publish(trainer, record, report.widths())
        if self.verbose and trainer.is_global_zero:
            _print(trainer, self._summary_line(trainer, record, report))

    def _summary_line(self, trainer: "pl.Trainer", record: Dict[str, float], report: Any) -> str:
        where = f"epoch {trainer.current_epoch}" if self.unit == "epoch" else f"step {trainer.global_step}"
        accs = " ".join(f"{k.replace('acc_', '')}={record[k]:.4f}" for k in
                        ("acc_pre", "acc_post", "acc_post_default", "acc_post_recalibrated") if k in record)
        return (f"[IntraFusion] event {int(record['event']) + 1}/{len(self.events)} at {where}: sparsity "
                f"{record['achieved_sparsity']:.1%}, params {report.params_before:,} -> {report.params_after:,}, "
                f"{accs}, {record['seconds']:.2f}s")

    def _rebuild_optimizers(self, trainer, pl_module, optimizer_state, learning_rates, scheduler_states, removals) -> None:
        if not trainer.optimizers:
            return
        strategy = trainer.strategy
        if type(strategy).__name__.startswith("DDP"):
            strategy.model = pl_module
            strategy.configure_ddp()
        strategy.setup_optimizers(trainer)
        for cfg, state in zip(trainer.lr_scheduler_configs, scheduler_states):
            cfg.scheduler.load_state_dict(state)
        for opt, rates in zip(trainer.optimizers, learning_rates):
            for group, lr in zip(opt.param_groups, rates):
                group["lr"] = lr
        restore_optimizer_state(trainer.optimizers, pl_module, optimizer_state, removals)

    # ------------------------------------------------------------------ evaluation
    def _val_batches(self, trainer: "pl.Trainer"):
        loaders = trainer.val_dataloaders
        if loaders is None:
            try:
                trainer.fit_loop.epoch_loop.val_loop.setup_data()
            except Exception:  # no validation data configured
                return None
            loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        return loaders

    def _limit(self, trainer: "pl.Trainer", loader) -> Optional[int]:
        limit = trainer.limit_val_batches
        if isinstance(limit, int):
            return limit
        if limit is None or limit >= 1.0:
            return None
        try:
            return max(1, int(math.ceil(limit * len(loader))))
        except TypeError:
            return None

    def _measure(self, trainer: "pl.Trainer", module: nn.Module) -> float:
        loader = self._val_batches(trainer)
        metric = self.metric if self.metric is not None else self._default_metric(module, loader)
        return evaluate(module, loader, metric, self._limit(trainer, loader), self.split, device=_device(module))

    def _default_metric(self, module: nn.Module, loader) -> Metric:
        if self._metric is None:
            x, _ = self.split(next(iter(loader)))
            one = x[:1] if isinstance(x, torch.Tensor) else x
            classes = eval_forward(module, to_device(one, _device(module))).shape[-1]
            self._metric = MulticlassAccuracy(num_classes=classes, average="micro")
        return self._metric

    def _measure_pruned_copy(self, trainer, pl_module, example, sparsity, method: str) -> float:
        """The metric of a copy pruned by ``method`` without data (the model itself is untouched)."""
        clone = _detached_copy(pl_module)
        prune(clone, example, sparsity, method=method, reference_widths=self.reference_widths or None,
              compensation=self.compensation, **self.prune_kwargs)
        return self._measure(trainer, clone)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {"fired": self.fired, "history": self.history, "reference_widths": dict(self.reference_widths),
                "records": [dict(r) for r in self.records], "events": list(self.events)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.fired = int(state_dict["fired"])
        self.history = [list(map(list, step)) for step in state_dict["history"]]
        self.reference_widths = {str(k): int(v) for k, v in state_dict["reference_widths"].items()}
        self.records = [dict(r) for r in state_dict.get("records", [])]
        self.tracker.rows = [dict(r) for r in self.records]

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: Dict[str, Any]) -> None:
        checkpoint["state_dict"][HISTORY_KEY] = json.dumps(self.history)

    def _rebuild_before_load(self, module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        """Before weights load: replay the pruning steps the checkpoint has and the model lacks."""
        saved = state_dict.pop(prefix + HISTORY_KEY, None)
        if saved is None:
            return
        history = json.loads(saved)
        if len(history) > len(self.history):
            replay_history(module, history[len(self.history):])
            self.history = history


def _print(trainer: "pl.Trainer", text: str) -> None:
    bar = trainer.progress_bar_callback
    if bar is not None and hasattr(bar, "print"):
        bar.print(text)  # keeps progress bars intact
    else:
        rank_zero_info(text)


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _detached_copy(pl_module: nn.Module) -> nn.Module:
    """A deep copy of a LightningModule without its Trainer reference."""
    saved = {k: pl_module.__dict__.get(k) for k in ("_trainer", "_fabric") if k in pl_module.__dict__}
    for k in saved:
        pl_module.__dict__[k] = None
    try:
        return copy.deepcopy(pl_module)
    finally:
        pl_module.__dict__.update(saved)
