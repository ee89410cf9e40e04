"""Pruned checkpoints: the pruning history travels inside ``checkpoint["state_dict"]`` (as a JSON
string under :data:`HISTORY_KEY`), so a fresh, unpruned module can be given the pruned shapes
before the weights load. Works with or without a Trainer."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from lightning_intrafusion.pruner import prune
from lightning_intrafusion.report import PruneReport
from lightning_intrafusion.surgery import replay_history

HISTORY_KEY = "intrafusion_history"


def _load(checkpoint: Union[str, Dict[str, Any]]) -> Dict[str, Any]:
    if isinstance(checkpoint, dict):
        return checkpoint
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def restore_pruned(module: nn.Module, checkpoint: Union[str, Dict[str, Any]], strict: bool = True) -> nn.Module:
    """Load a pruned checkpoint (written by :class:`IntraFusionCallback` or :func:`prune_checkpoint`)
    into a freshly built, unpruned module: replays the pruning history, then loads the weights.

    ``model = restore_pruned(MyModule(**hparams), "last.ckpt")``
    """
    state = dict(_load(checkpoint)["state_dict"])
    history = json.loads(state.pop(HISTORY_KEY, "[]"))
    replay_history(module, history)
    module.load_state_dict(state, strict=strict)
    return module


def prune_checkpoint(module: nn.Module, checkpoint: Union[str, Dict[str, Any]], example_inputs: Any,
                     sparsity: float, output: Optional[str] = None, **prune_kwargs: Any) -> PruneReport:
    """One-shot, data-free pruning of a checkpoint: load it into ``module`` (a fresh instance of its
    class; earlier pruning steps are replayed), :func:`prune` it, and, with ``output``, write a
    checkpoint that :func:`restore_pruned` (or a resumed Trainer with the callback) loads.
    """
    ckpt = _load(checkpoint)
    history = json.loads(ckpt["state_dict"].get(HISTORY_KEY, "[]"))
    restore_pruned(module, ckpt)
    report = prune(module, example_inputs, sparsity, **prune_kwargs)
    if output is not None:
        state = dict(module.state_dict())
        state[HISTORY_KEY] = json.dumps(history + [report.removals])
        torch.save({**{k: v for k, v in ckpt.items() if k != "state_dict"}, "state_dict": state}, output)
    return report
