"""Accuracy (or any torchmetrics metric) of a module on a dataloader, without side effects."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torchmetrics import Metric

from lightning_intrafusion.execution import call_model, preserved_modes


def split_batch(batch: Any):
    """``(inputs, target)`` from a batch given as ``(x, y)``/``[x, y]`` or ``{"input"|"x": .., "target"|"y"|"label": ..}``."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        x = next((batch[k] for k in ("input", "inputs", "x", "image", "images") if k in batch), None)
        y = next((batch[k] for k in ("target", "targets", "y", "label", "labels") if k in batch), None)
        if x is not None and y is not None:
            return x, y
    raise ValueError("cannot split the batch into (inputs, target); pass batch_to_inputs= to the callback")


@torch.no_grad()
def evaluate(module: nn.Module, batches: Iterable[Any], metric: Metric, max_batches: Optional[int] = None,
             split: Callable[[Any], Any] = split_batch, device: Optional[torch.device] = None) -> float:
    """``metric`` over ``batches`` with ``module`` in eval mode; modes and the metric are reset after."""
    metric.reset()
    with preserved_modes(module):
        module.eval()
        try:
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = split(batch)
                if device is not None:
                    x, y = to_device(x, device), y.to(device)
                metric.to(y.device)
                metric.update(call_model(module, x), y)
            return float(metric.compute())
        finally:
            metric.reset()


def to_device(inputs: Any, device: torch.device) -> Any:
    """Move a tensor, or the tensors of a tuple/list/dict, to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs
