"""IntraFusionCallback from a LightningCLI YAML file: the same training and pruning as
``train_and_prune.py``, configured without code.

    python examples/cli.py fit --config examples/cli.yaml
    python examples/cli.py fit --config examples/cli.yaml --trainer.max_epochs=20   # override any field
    python examples/cli.py fit --print_config                                      # every option

The callback, its schedule, its OT settings and the loggers are all in ``cli.yaml``.
"""

from lightning.pytorch.cli import LightningCLI

from lightning_intrafusion.datasets import DigitsDataModule
from train_and_prune import Classifier


def main(args=None) -> LightningCLI:
    return LightningCLI(Classifier, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
