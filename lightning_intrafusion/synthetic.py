"""Data-free calibration inputs, distilled from a model's own BatchNorm statistics (ZeroQ, Cai et al.,
CVPR 2020): a batch of random inputs is optimised until every BatchNorm sees batch statistics equal to
its running statistics. The batch then stands in for training data when BN statistics are re-estimated
after pruning (:func:`~lightning_intrafusion.calibration.recalibrate_batchnorm`); no sample of the
training data is needed, only the inputs' shapes.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from lightning_intrafusion.calibration import tracking_batchnorms
from lightning_intrafusion.execution import call_model, preserved_modes


def synthesize_inputs(
    model: nn.Module,
    example_inputs: Any,
    num_samples: int = 64,
    steps: int = 200,
    lr: float = 0.1,
    batch_size: Optional[int] = None,
    seed: int = 0,
) -> List[Any]:
    """Inputs whose statistics, at every BatchNorm of ``model``, match its running statistics.

    Every floating-point tensor of ``example_inputs`` (a tensor, tuple, list or dict, batch along dim 0)
    is replaced by ``num_samples`` standard-normal samples of the same shape, which Adam (``steps`` steps,
    learning rate ``lr``) moves to minimise, summed over the BatchNorms, the mean squared difference
    between each channel's batch mean and standard deviation and the running ones. Other tensors (token
    ids, masks) are repeated along the batch. ``model`` is run in eval mode and left as it was.

    Returns a list of input batches like ``example_inputs`` (``batch_size`` samples each, default all),
    to pass as ``calibration_data``. Call it on the model *before* pruning: the pruned model's statistics
    are the ones to re-estimate. Deterministic for a given ``seed``.
    """
    if int(num_samples) < 2 or int(steps) < 0 or not lr > 0:
        raise ValueError(f"need num_samples >= 2, steps >= 0 and lr > 0, got {num_samples}, {steps}, {lr}")
    norms = list(tracking_batchnorms(model).values())
    if not norms:
        raise ValueError("synthetic calibration inputs are distilled from BatchNorm running statistics, and the model "
                         "has no BatchNorm that tracks them")
    generator = torch.Generator().manual_seed(int(seed))
    leaves: List[Tensor] = []
    inputs = _replace_leaves(example_inputs, lambda t: _fresh_leaf(t, int(num_samples), generator, leaves))
    if not leaves:
        raise ValueError("synthetic calibration inputs need floating-point inputs (e.g. images); example_inputs "
                         "has none (token ids cannot be optimised)")

    seen: List[Tuple[nn.Module, Tensor]] = []
    hooks = [m.register_forward_hook(lambda module, args, output: seen.append((module, args[0]))) for m in norms]
    frozen = {p: p.requires_grad for p in model.parameters()}
    optimizer = torch.optim.Adam(leaves, lr=lr)
    try:
        for p in frozen:
            p.requires_grad_(False)
        with preserved_modes(model), torch.enable_grad():
            model.eval()
            for _ in range(int(steps)):
                seen.clear()
                optimizer.zero_grad()
                call_model(model, inputs)
                loss = sum(_statistics_mismatch(module, x) for module, x in seen)
                if not torch.is_tensor(loss):
                    raise ValueError("no BatchNorm was reached by a forward pass on the example inputs")
                loss.backward()
                optimizer.step()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return _split(_replace_leaves(inputs, lambda t: t.detach()), int(num_samples), batch_size)


def _statistics_mismatch(norm: nn.Module, x: Tensor) -> Tensor:
    """Mean squared difference of per-channel batch mean and std from the BN's running mean and std."""
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dims)
    std = (x.var(dims, unbiased=False) + norm.eps).sqrt()
    return ((mean - norm.running_mean).pow(2).mean()
            + (std - (norm.running_var + norm.eps).sqrt()).pow(2).mean())


def _fresh_leaf(t: Tensor, n: int, generator: torch.Generator, leaves: List[Tensor]) -> Tensor:
    if t.is_floating_point() and t.dim() > 0:
        leaf = torch.randn((n, *t.shape[1:]), generator=generator).to(device=t.device, dtype=t.dtype).requires_grad_(True)
        leaves.append(leaf)
        return leaf
    if t.dim() == 0:
        return t
    return t.index_select(0, torch.arange(n, device=t.device) % t.shape[0])  # ids, masks: repeated


def _replace_leaves(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _replace_leaves(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_replace_leaves(v, fn) for v in obj)
    return obj


def _split(inputs: Any, n: int, batch_size: Optional[int]) -> List[Any]:
    size = n if batch_size is None else max(1, int(batch_size))
    return [_replace_leaves(inputs, lambda t, lo=lo: t[lo:lo + size] if t.dim() and t.shape[0] == n else t)
            for lo in range(0, n, size)]
