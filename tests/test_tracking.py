"""Pruning metrics reach real loggers: an offline W&B run read back from disk, and a CSVLogger."""

import csv
import glob
import os

import lightning.pytorch as pl
import pytest
import wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lit import LitClassifier
from lightning_intrafusion import IntraFusionCallback, wandb_logger
from lightning_intrafusion.datasets import DigitsDataModule
from wandb_reader import read_run

KEYS = ["intrafusion/sparsity", "intrafusion/acc_pre", "intrafusion/acc_post", "intrafusion/acc_post_default",
        "intrafusion/acc_post_recalibrated", "intrafusion/params", "intrafusion/macs", "intrafusion/seconds",
        "intrafusion/event"]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    wandb.finish()
    wandb.teardown()


def _fit(tmp_path, loggers, epochs=4):
    pl.seed_everything(0)
    cb = IntraFusionCallback(target_sparsity=0.5, start=1, end=2, schedule="linear", recalibrate_batches=2)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb], logger=loggers, default_root_dir=tmp_path,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=5)
    trainer.fit(LitClassifier(), datamodule=DigitsDataModule())
    return trainer, cb


def test_offline_wandb_run_holds_metrics_table_plot_summary_and_config(tmp_path, wandb_env):
    logger = WandbLogger(project="test", save_dir=str(tmp_path))
    trainer, cb = _fit(tmp_path, [logger])
    logger.experiment.finish()  # flushes the offline run file
    run = read_run(str(tmp_path))

    events = [row for row in run["history"] if "intrafusion/acc_post" in row]
    assert len(events) == 2, (run["kinds"], run["size"])
    for row, record in zip(events, cb.records):
        for key in KEYS:
            assert key in row, key
            assert row[key] == pytest.approx(record[key.split("/")[1]], rel=1e-6)
    # the pruning axis and the per-event media
    assert ("intrafusion/*", "intrafusion/event") in run["metrics"]
    assert ("intrafusion/by_sparsity/*", "intrafusion/sparsity_axis") in run["metrics"]
    by_sparsity = [row for row in run["history"] if "intrafusion/by_sparsity/acc_post" in row]
    assert [r["intrafusion/sparsity_axis"] for r in by_sparsity] == pytest.approx([r["sparsity"] for r in cb.records])
    assert [r["intrafusion/by_sparsity/acc_post"] for r in by_sparsity] == pytest.approx([r["acc_post"] for r in cb.records])
    media = [row for row in run["history"] if "intrafusion/history" in row]
    assert len(media) == 2
    table_path = os.path.join(run["dir"], "files", media[-1]["intrafusion/history"]["path"])
    table = __import__("json").load(open(table_path))
    assert len(table["data"]) == 2
    sparsity_col = table["columns"].index("sparsity")
    assert [r[sparsity_col] for r in table["data"]] == pytest.approx([r["sparsity"] for r in cb.records])
    image = media[-1]["intrafusion/accuracy_vs_sparsity"]
    assert image["_type"] == "image-file" and os.path.getsize(os.path.join(run["dir"], "files", image["path"])) > 1000
    # summary and config
    assert run["summary"]["intrafusion/final_sparsity"] == pytest.approx(0.5)
    assert run["summary"]["intrafusion/param_reduction"] > 0.5
    assert "intrafusion/mean_fusion_gain_over_default" in run["summary"]
    assert run["config"]["intrafusion"]["target_sparsity"] == 0.5
    assert trainer.callback_metrics["intrafusion/acc_post"] == pytest.approx(cb.records[-1]["acc_post"])


def test_csv_logger_gets_the_same_keys_and_a_png(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv")
    _, cb = _fit(tmp_path, [logger])
    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    events = [r for r in rows if r.get("intrafusion/acc_post")]
    assert len(events) == 2
    for row, record in zip(events, cb.records):
        for key in KEYS:
            assert float(row[key]) == pytest.approx(record[key.split("/")[1]], rel=1e-5)
    assert os.path.getsize(os.path.join(logger.log_dir, "intrafusion_accuracy_vs_sparsity.png")) > 1000


def test_no_logger_still_works_and_the_console_table_holds_the_records(tmp_path):
    _, cb = _fit(tmp_path, False, epochs=3)
    assert cb.fired == 2
    lines = cb.tracker.text_table().splitlines()
    assert lines[0].split() == ["event", "epoch", "sparsity", "acc", "before", "after", "fusion", "plain", "pruning",
                                "fusion+calibration", "params", "MACs", "seconds"]
    for line, record in zip(lines[1:3], cb.records):
        cells = line.split()
        assert cells[0] == str(int(record["event"]) + 1) and cells[2] == f"{record['achieved_sparsity']:.1%}"
        assert cells[3:7] == [f"{record[k]:.1%}" for k in ("acc_pre", "acc_post", "acc_post_default", "acc_post_recalibrated")]
        assert cells[7] == f"{int(record['params']):,}"
    assert lines[3] == (f"params {int(cb.records[0]['params_before']):,} -> {int(cb.records[-1]['params']):,} "
                        f"({1 - cb.records[-1]['params'] / cb.records[0]['params_before']:.0%} fewer), MACs "
                        f"{int(cb.records[0]['macs_before']):,} -> {int(cb.records[-1]['macs']):,} "
                        f"({cb.records[0]['macs_before'] / cb.records[-1]['macs']:.1f}x fewer)")


def test_wandb_without_credentials_falls_back_to_offline(tmp_path, wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.warns(UserWarning, match="logging offline"):
        logger = wandb_logger(project="test", save_dir=str(tmp_path))
    _, cb = _fit(tmp_path, [logger], epochs=3)
    assert cb.fired == 2
    logger.experiment.finish()
    assert glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*", "run-*.wandb"))


def test_tensorboard_logger_gets_the_same_keys(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    _, cb = _fit(tmp_path, [logger], epochs=3)
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    for key in KEYS:
        values = [e.value for e in acc.Scalars(key)]
        assert values == pytest.approx([r[key.split("/")[1]] for r in cb.records], rel=1e-5), key
