"""IntraFusionCallback configured from LightningCLI YAML (layers by globs, schedule by name or class_path)."""

import pytest

pytest.importorskip("jsonargparse")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lit import LitClassifier  # noqa: E402
from lightning_intrafusion import IntraFusionCallback  # noqa: E402
from lightning_intrafusion.datasets import DigitsDataModule  # noqa: E402

CONFIG = """
trainer:
  max_epochs: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning_intrafusion.IntraFusionCallback
      init_args:
        target_sparsity: 0.5
        start: 1
        end: 2
        schedule: {schedule}
        exclude: ["net.classifier.*"]
        ot_config:
          class_path: lightning_intrafusion.OTConfig
          init_args:
            formulation: balanced
            p: 1.0
"""


@pytest.mark.parametrize("schedule", ["linear", "{class_path: lightning_intrafusion.ExponentialSchedule, init_args: {target: 0.5}}"])
def test_lightning_cli_yaml(tmp_path, schedule):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(root=tmp_path, schedule=schedule))
    cli = LightningCLI(LitClassifier, DigitsDataModule, args=["fit", "--config", str(path)], save_config_kwargs={"overwrite": True})
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, IntraFusionCallback))
    assert cb.fired == 2
    assert cb.prune_kwargs["ot_config"].formulation == "balanced"
    assert cli.model.net.classifier[1].out_features == 32  # excluded group untouched
    assert cli.model.net.features[0][0].out_channels == 4  # pruned 8 -> 4
