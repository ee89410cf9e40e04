"""Data-aware repair after pruning: re-estimate normalisation statistics on a few batches
(adaptive BN, Li et al., ECCV 2020), and measure how far they are off before deciding to.
Forward passes only; no weight is trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from lightning_intrafusion.execution import call_model, preserved_modes


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], max_batches: Optional[int] = None) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as the exact average over
    ``batches``. Only BN layers are switched to train mode; the rest of the model (dropout, ...) runs in
    eval mode, and every module's mode is restored afterwards. Returns the number of batches used.
    On any error (no batch, a batch the model rejects) the old statistics are put back."""
    norms = list(tracking_batchnorms(model).values())
    if not norms:
        return 0
    momenta = {m: m.momentum for m in norms}
    names = ("running_mean", "running_var", "num_batches_tracked")
    old = {m: {name: getattr(m, name) for name in names if getattr(m, name, None) is not None} for m in norms}
    with preserved_modes(model):
        try:
            model.eval()
            for m in norms:
                # fresh buffers: the old ones stay untouched, for the rollback here or a caller's
                for name, value in old[m].items():
                    setattr(m, name, value.clone())
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average = exact mean over the batches
                m.train()
            return run_batches(model, batches, max_batches, "calibration_data")
        except BaseException:
            for m, buffers in old.items():
                for name, value in buffers.items():
                    setattr(m, name, value)
            raise
        finally:
            for m, momentum in momenta.items():
                m.momentum = momentum


@dataclass
class BatchNormDrift:
    """How the inputs one BatchNorm sees in eval mode differ from its running statistics, per channel.

    Attributes:
        variance_ratio: input variance / ``running_var`` (1: the BN normalises correctly; below 1 it
            under-normalises, so its output shrinks).
        mean_shift: ``(input mean - running_mean) / sqrt(running_var + eps)``.
        output_variance: variance of the BN's eval-mode output (the signal the next layer gets).
    """

    variance_ratio: torch.Tensor
    mean_shift: torch.Tensor
    output_variance: torch.Tensor


@torch.no_grad()
def batchnorm_drift(model: nn.Module, batches: Iterable[Any], max_batches: Optional[int] = None) -> Dict[str, BatchNormDrift]:
    """Run ``model`` in eval mode on ``batches`` and compare every BatchNorm's input statistics with its
    running statistics (nothing is modified; modes are restored). Keyed by module name, in model order.
    After a data-free pruning step this shows whether re-estimating the statistics
    (:func:`recalibrate_batchnorm`) is worth it."""
    norms = tracking_batchnorms(model)
    inputs_seen: Dict[str, ChannelMoments] = {name: ChannelMoments() for name in norms}
    outputs_seen: Dict[str, ChannelMoments] = {name: ChannelMoments() for name in norms}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            inputs_seen[name].add(inputs[0])
            outputs_seen[name].add(output)
        return hook

    observe_batches(model, batches, max_batches, "batches",
                    [m.register_forward_hook(record(name)) for name, m in norms.items()])
    drift = {}
    for name, m in norms.items():
        if inputs_seen[name].count < 2:
            continue  # a BN the batches never reached
        mean, var = inputs_seen[name].mean_and_variance()
        running_var = m.running_var.double()
        drift[name] = BatchNormDrift(
            variance_ratio=(var / running_var.clamp_min(1e-12)).float(),
            mean_shift=((mean - m.running_mean.double()) / (running_var + m.eps).sqrt()).float(),
            output_variance=outputs_seen[name].mean_and_variance()[1].float(),
        )
    return drift


def tracking_batchnorms(model: nn.Module) -> Dict[str, nn.Module]:
    """The BatchNorm layers of ``model`` that keep running statistics, by name, in model order."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def run_batches(model: nn.Module, batches: Iterable[Any], max_batches: Optional[int], label: str) -> int:
    """Forward passes over at most ``max_batches`` of ``batches``; returns how many ran."""
    used = 0
    for batch in batches:
        if max_batches is not None and used >= max_batches:
            break
        call_model(model, batch)
        used += 1
    if used == 0:
        raise ValueError(f"{label} yielded no batch")
    return used


def observe_batches(model: nn.Module, batches: Iterable[Any], max_batches: Optional[int], label: str,
                    hooks: Sequence[Any]) -> int:
    """:func:`run_batches` in eval mode for the hooks behind the ``hooks`` handles (there to observe the
    passes): they are removed and every module's mode is restored afterwards, whatever happens."""
    try:
        with preserved_modes(model):
            return run_batches(model.eval(), batches, max_batches, label)
    finally:
        for handle in hooks:
            handle.remove()


PRODUCT_ROWS = 2048  # rows (samples, pixels, tokens) gathered before they are multiplied into ChannelMoments.products


class ChannelMoments:
    """Running per-channel sums of a stream of tensors whose channels lie along ``dim`` (``(N, C, ...)``
    by default), in double precision; with ``cross=True`` also the sums of products of every channel pair
    (for :meth:`second_moment`: ``C x C`` memory), taken over :data:`PRODUCT_ROWS` rows at a time, so that a
    wide layer seen in many small batches does not add up a full ``C x C`` matrix per batch; each such product
    is computed in ``product_dtype`` (single precision: about twice as fast, for moments that are modelled
    anyway) and summed in double precision."""

    def __init__(self, dim: int = 1, cross: bool = False, product_dtype: torch.dtype = torch.float64) -> None:
        self.dim = dim
        self.cross = cross
        self.product_dtype = product_dtype
        self.total: Any = 0.0
        self.squares: Any = 0.0
        self.products: Any = 0.0
        self.count = 0
        self._pending: List[torch.Tensor] = []  # rows not yet in ``products``
        self._pending_rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double().movedim(self.dim, 0)
        x = x.reshape(x.shape[0], -1)
        self.total = self.total + x.sum(1)
        self.squares = self.squares + x.pow(2).sum(1)
        if self.cross:
            self._pending.append(x)
            self._pending_rows += x.shape[1]
            if self._pending_rows >= PRODUCT_ROWS:
                self._add_pending_products()
        self.count += x.shape[1]

    def _add_pending_products(self) -> None:
        if self._pending:
            rows = torch.cat(self._pending, 1).to(self.product_dtype)
            self._pending, self._pending_rows = [], 0
            self.products = self.products + (rows @ rows.T).double()

    def mean(self) -> torch.Tensor:
        """Per-channel mean."""
        return self.total / self.count

    def mean_and_variance(self) -> tuple:
        """Per-channel mean and unbiased variance (as BatchNorm's running variance)."""
        mean = self.mean()
        return mean, (self.squares - self.count * mean.pow(2)) / (self.count - 1)

    def second_moment(self) -> torch.Tensor:
        """``E[x x^T]`` over all positions, ``(C, C)`` (needs ``cross=True``)."""
        if not self.cross:
            raise RuntimeError("ChannelMoments(cross=False) keeps no products of channel pairs")
        self._add_pending_products()
        return self.products / self.count
