"""The shipped examples run as the README tells users to run them (as subprocesses, from a scratch
directory): the training example, and the LightningCLI example with its YAML file as shipped."""

import csv
import os
import subprocess
import sys

import pytest

from wandb_reader import read_run

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _run(tmp_path, *args: str):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               PYTHONWARNINGS="ignore")
    env.pop("WANDB_API_KEY", None)
    done = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, done.stderr


def _event_rows(metrics_csv: str) -> list:
    with open(metrics_csv) as f:
        return [row for row in csv.DictReader(f) if row["intrafusion/event"]]


def test_cli_example_trains_and_prunes_as_configured_in_its_yaml(tmp_path):
    out, err = _run(tmp_path, os.path.join(EXAMPLES, "cli.py"), "fit", "--config", os.path.join(EXAMPLES, "cli.yaml"),
               "--trainer.enable_progress_bar=false")
    rows = _event_rows(str(tmp_path / "runs" / "cli" / "csv" / "version_0" / "metrics.csv"))
    # cli.yaml: events at epochs 2, 4, 6, 8 on a cubic schedule to 70%, with 8 calibration batches
    assert [int(float(r["intrafusion/event"])) for r in rows] == [0, 1, 2, 3]
    reached = [float(r["intrafusion/achieved_sparsity"]) for r in rows]
    assert reached == sorted(reached) and reached[-1] == pytest.approx(0.7, abs=0.01)
    assert all(r["intrafusion/acc_post_recalibrated"] and r["intrafusion/acc_post_default"] for r in rows)
    assert float(rows[-1]["intrafusion/params"]) < 0.2 * float(rows[0]["intrafusion/params_before"])
    assert "[IntraFusion] event 4/4 at epoch 8: sparsity 70.0%" in out + err  # one progress line per event
    run = read_run(str(tmp_path / "runs" / "cli"))
    assert run["config"]["intrafusion"]["target_sparsity"] == 0.7
    assert run["config"]["intrafusion"]["recalibrate_batches"] == 8
    assert run["summary"]["intrafusion/final_sparsity"] == pytest.approx(0.7)


def test_training_example_prints_its_table_and_writes_the_plot(tmp_path):
    out, _ = _run(tmp_path, os.path.join(EXAMPLES, "train_and_prune.py"), "--epochs", "3", "--events", "1", "2",
               "--target", "0.5", "--save-dir", "runs")
    table = out[out.index("[IntraFusion] pruning events:"):].splitlines()[1:]  # printed by the callback at fit end
    assert table[0].split()[:3] == ["event", "epoch", "sparsity"]
    assert [line.split()[:2] for line in table[1:3]] == [["1", "1"], ["2", "2"]]
    assert table[2].split()[2] == "50.0%"
    assert table[3].startswith("params ") and "fewer" in table[3]
    assert "final: val accuracy" in out
    assert os.path.getsize(tmp_path / "runs" / "csv" / "version_0" / "intrafusion_accuracy_vs_sparsity.png") > 1000
    assert len(_event_rows(str(tmp_path / "runs" / "csv" / "version_0" / "metrics.csv"))) == 2
