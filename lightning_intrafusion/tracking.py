"""What a pruning event reports, and how it reaches the Trainer's loggers.

Scalars go to every logger once per event under the same ``intrafusion/<name>`` keys, and into
``trainer.callback_metrics`` (so ModelCheckpoint and EarlyStopping can monitor them). With a
``WandbLogger`` there are also pruning axes (event index, and sparsity for ``by_sparsity/*``), a history table, an accuracy-vs-sparsity plot and a run
summary; other loggers with a directory get the plot as a PNG. Knows loggers, not pruning.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch

PREFIX = "intrafusion/"
ACCURACY_KEYS = ("acc_pre", "acc_post", "acc_post_default", "acc_post_recalibrated")
TABLE_COLUMNS = ["event", "epoch", "step", "sparsity", "params", "macs", "seconds", *ACCURACY_KEYS, "widths"]


def metric_name(key: str) -> str:
    return PREFIX + key


def is_wandb(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger"


def ensure_wandb_usable(loggers: Sequence[Any]) -> List[str]:
    """Start every W&B run now (not mid-fit). A run that cannot start online (no API key, no network)
    is switched to offline mode with one clear message. Returns the messages given."""
    messages = []
    for logger in loggers:
        if not is_wandb(logger):
            continue
        try:
            logger.experiment
        except Exception as err:  # wandb raises several types for missing credentials / network
            init = getattr(logger, "_wandb_init", None)
            if init is None:
                raise
            init["mode"] = "offline"
            os.environ["WANDB_MODE"] = "offline"
            message = (f"W&B could not start online ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                       "logging offline instead. Sync later with `wandb sync <save_dir>/wandb/offline-run-*`.")
            warnings.warn(message, stacklevel=2)
            messages.append(message)
            logger.experiment
    return messages


def wandb_logger(**kwargs: Any):
    """A ``WandbLogger`` whose run is started right away; without credentials or network it falls back
    to offline mode with one clear message (Lightning would otherwise fail at the start of fit)."""
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(**kwargs)
    ensure_wandb_usable([logger])
    return logger


class PruningTracker:
    """Collects event records and publishes them to loggers (media on global rank zero only)."""

    def __init__(self, settings: Dict[str, Any]) -> None:
        self.settings = settings
        self.rows: List[Dict[str, Any]] = []
        self._axis_defined = False

    def publish(self, trainer: Any, record: Dict[str, Any], widths: Dict[str, int]) -> None:
        row = dict(record, epoch=trainer.current_epoch, step=trainer.global_step, widths=dict(widths))
        self.rows.append(row)
        scalars = {metric_name(k): float(v) for k, v in record.items() if isinstance(v, (int, float))}
        # callback_metrics on every rank (ModelCheckpoint / EarlyStopping may monitor them) ...
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars.items()})
        if not trainer.is_global_zero:
            return
        # ... and each logger exactly once, with the same keys everywhere, then its media
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if is_wandb(logger):
                self._to_wandb(logger, row)
            else:
                directory = _logger_dir(logger)
                if directory:
                    self.plot(os.path.join(directory, "intrafusion_accuracy_vs_sparsity.png"))

    def summary(self) -> Dict[str, float]:
        """Final sparsity, reductions, accuracy change and fusion gain over default."""
        if not self.rows:
            return {}
        first, last = self.rows[0], self.rows[-1]
        out = {"final_sparsity": last["sparsity"], "final_params": last["params"], "final_macs": last["macs"]}
        if first.get("params_before"):
            out["param_reduction"] = 1.0 - last["params"] / first["params_before"]
        if first.get("macs_before"):
            out["mac_reduction"] = 1.0 - last["macs"] / first["macs_before"]
        if "acc_pre" in first and "acc_post" in last:
            out["accuracy_change"] = last["acc_post"] - first["acc_pre"]
        gains = [r["acc_post"] - r["acc_post_default"] for r in self.rows if "acc_post_default" in r and "acc_post" in r]
        if gains:
            out["mean_fusion_gain_over_default"] = sum(gains) / len(gains)
        return out

    def text_table(self, unit: str = "epoch") -> str:
        """The events as a console table: when, sparsity reached, the accuracies measured (those present),
        parameters, MACs and seconds; then the overall reduction."""
        if not self.rows:
            return "no pruning event yet"
        headers = {"acc_pre": "acc before", "acc_post": "after fusion", "acc_post_default": "plain pruning",
                   "acc_post_recalibrated": "fusion+calibration"}
        accuracy = [k for k in ACCURACY_KEYS if any(k in r for r in self.rows)]
        columns = ["event", unit, "sparsity", *(headers[k] for k in accuracy), "params", "MACs", "seconds"]
        lines = []
        for r in self.rows:
            when = r.get(unit if unit == "epoch" else "step")
            cells = [str(int(r["event"]) + 1), "" if when is None else str(when), f"{r['achieved_sparsity']:.1%}",
                     *("" if k not in r else f"{r[k]:.1%}" for k in accuracy),
                     f"{int(r['params']):,}", f"{int(r['macs']):,}", f"{r['seconds']:.2f}"]
            lines.append(cells)
        widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]
        text = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
        text += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
        first, last = self.rows[0], self.rows[-1]
        if first.get("params_before") and first.get("macs_before"):
            text.append(f"params {int(first['params_before']):,} -> {int(last['params']):,} "
                        f"({1 - last['params'] / first['params_before']:.0%} fewer), MACs {int(first['macs_before']):,} -> "
                        f"{int(last['macs']):,} ({first['macs_before'] / max(last['macs'], 1):.1f}x fewer)")
        return "\n".join(text)

    def table_rows(self) -> List[List[Any]]:
        return [[r.get(c) if c != "widths" else str(r.get("widths")) for c in TABLE_COLUMNS] for r in self.rows]

    def plot(self, path: Optional[str] = None):
        """Accuracy (pre, post, default, recalibrated) against sparsity; saved to ``path`` if given."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        sparsity = [100 * r["sparsity"] for r in self.rows]
        labels = {"acc_pre": "before event", "acc_post": "after fusion (data-free)",
                  "acc_post_default": "plain pruning", "acc_post_recalibrated": "after fusion + calibration"}
        for key, label in labels.items():
            points = [(s, 100 * r[key]) for s, r in zip(sparsity, self.rows) if key in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Intra-Fusion: accuracy vs sparsity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fig.savefig(path, dpi=100)
        plt.close(fig)
        return fig

    def _to_wandb(self, logger: Any, row: Dict[str, Any]) -> None:
        import wandb

        run = logger.experiment
        if not self._axis_defined:
            run.define_metric(metric_name("event"))
            run.define_metric(metric_name("*"), step_metric=metric_name("event"))
            # the same accuracies once more, charted against sparsity
            run.define_metric(metric_name("sparsity_axis"))
            run.define_metric(metric_name("by_sparsity/*"), step_metric=metric_name("sparsity_axis"))
            run.config.update({"intrafusion": self.settings}, allow_val_change=True)
            self._axis_defined = True
        directory = os.path.join(logger.save_dir or ".", "intrafusion")
        png = os.path.join(directory, f"accuracy_vs_sparsity_{len(self.rows)}.png")
        self.plot(png)
        run.log({
            metric_name("history"): wandb.Table(columns=TABLE_COLUMNS, data=self.table_rows()),
            metric_name("accuracy_vs_sparsity"): wandb.Image(png),
            metric_name("event"): row["event"],
            metric_name("sparsity_axis"): row["sparsity"],
            **{metric_name(f"by_sparsity/{k}"): row[k] for k in ACCURACY_KEYS if k in row},
        })
        for key, value in self.summary().items():
            run.summary[metric_name(key)] = value


def _logger_dir(logger: Any) -> Optional[str]:
    for attr in ("log_dir", "save_dir"):
        try:
            value = getattr(logger, attr, None)
        except Exception:
            value = None
        if value:
            return str(value)
    return None
