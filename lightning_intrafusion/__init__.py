"""Intra-Fusion structured pruning for PyTorch and PyTorch Lightning."""

from lightning_intrafusion.attention import PrunableMultiheadAttention
from lightning_intrafusion.calibration import BatchNormDrift, batchnorm_drift, recalibrate_batchnorm
from lightning_intrafusion.callback import IntraFusionCallback
from lightning_intrafusion.checkpoint import prune_checkpoint, restore_pruned
from lightning_intrafusion.cost import count_macs_and_params
from lightning_intrafusion.forward_check import ForwardBrokenError
from lightning_intrafusion.graph import UnsupportedModelError
from lightning_intrafusion.ot import OTConfig, TransportError
from lightning_intrafusion.pruner import prune
from lightning_intrafusion.report import GroupReport, PruneReport
from lightning_intrafusion.schedule import (
    ConstantSchedule,
    CubicSchedule,
    ExplicitSchedule,
    ExponentialSchedule,
    LinearSchedule,
    SparsitySchedule,
)
from lightning_intrafusion.synthetic import synthesize_inputs
from lightning_intrafusion.tracking import wandb_logger

__version__ = "0.1.0"

__all__ = [
    "ConstantSchedule",
    "CubicSchedule",
    "ExplicitSchedule",
    "ExponentialSchedule",
    "IntraFusionCallback",
    "LinearSchedule",
    "PrunableMultiheadAttention",
    "SparsitySchedule",
    "prune_checkpoint",
    "restore_pruned",
    "wandb_logger",
    "GroupReport",
    "OTConfig",
    "PruneReport",
    "TransportError",
    "UnsupportedModelError",
    "ForwardBrokenError",
    "count_macs_and_params",
    "prune",
    "BatchNormDrift",
    "batchnorm_drift",
    "recalibrate_batchnorm",
    "synthesize_inputs",
]
