"""Data-aware repair after pruning: re-estimate normalisation statistics on a few batches
(adaptive BN, Li et al., ECCV 2020). Forward passes only; no weight is trained."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from lightning_intrafusion.execution import call_model, preserved_modes


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], max_batches: Optional[int] = None) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as the exact average over
    ``batches``. Only BN layers are switched to train mode; the rest of the model (dropout, ...) runs in
    eval mode, and every module's mode is restored afterwards. Returns the number of batches used."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = {m: m.momentum for m in norms}
    used = 0
    with preserved_modes(model):
        try:
            model.eval()
            for m in norms:
                # fresh buffers: the old ones stay untouched for a caller that wants to roll back
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    if getattr(m, name, None) is not None:
                        setattr(m, name, getattr(m, name).clone())
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average = exact mean over the batches
                m.train()
            for batch in batches:
                if max_batches is not None and used >= max_batches:
                    break
                call_model(model, batch)
                used += 1
        finally:
            for m, momentum in momenta.items():
                m.momentum = momentum
    if used == 0:
        raise ValueError("calibration_data yielded no batch")
    return used
