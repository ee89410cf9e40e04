"""Mean compensation: what a removed channel contributed on average stays in the consumer's bias.

A channel that is removed (or, under partial OT, discarded rather than merged) takes away its
contribution ``W[:, j] * x_j`` to every layer that consumes it. Its *expected* part, ``W[:, j] * E[x_j]``,
need not be lost: it is a constant that the consumer's bias can carry. This needs the channels' means,
so it runs only with calibration data, measured on the model as it is before the step (forward passes
only). Where BatchNorm follows the consumer, re-estimating its statistics absorbs the shift anyway; where
nothing normalises the consumer's output (transformer blocks, classifiers, plain MLPs), it is what keeps
the residual stream and the logits centred.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_intrafusion.calibration import ChannelMoments, observe_batches
from lightning_intrafusion.fusion import ChannelSlice


@torch.no_grad()
def consumer_input_means(model: nn.Module, batches: Iterable[Any], max_batches: Optional[int] = None) -> Dict[str, Tensor]:
    """The mean input of every layer that has a bias to carry a compensation, per input channel, keyed by
    the layer's weight (``"blocks.0.fc2.weight"``): linear layers (mean over all but the last dim),
    convolutions (all but dim 1) and the output projection of ``nn.MultiheadAttention``, which the module
    applies without calling it (its mean input follows from the module's mean output: ``W m = E[y] - b``).
    The model runs in eval mode; modes are restored."""
    moments: Dict[str, ChannelMoments] = {}

    def add(key: str, values: Any, dim: int) -> None:
        if isinstance(values, Tensor) and values.dim() > 0:
            moments.setdefault(key, ChannelMoments(dim)).add(values)

    hooks = []
    attention_outputs: Dict[str, nn.MultiheadAttention] = {}
    for name, module in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if isinstance(module, nn.MultiheadAttention) and getattr(module.out_proj, "bias", None) is not None:
            attention_outputs[f"{name}.out_proj.weight" if name else "out_proj.weight"] = module
            hooks.append(module.register_forward_hook(
                lambda m, args, output, key=f"{name}.out_proj.output": add(key, output[0] if isinstance(output, tuple) else output, -1)))
        elif isinstance(module, nn.Linear) and module.bias is not None:
            hooks.append(module.register_forward_pre_hook(lambda m, args, key=key: add(key, args[0] if args else None, -1)))
        elif (isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd)
              and module.bias is not None):
            hooks.append(module.register_forward_pre_hook(lambda m, args, key=key: add(key, args[0] if args else None, 1)))
    observe_batches(model, batches, max_batches, "calibration_data", hooks)
    means = {key: m.mean() for key, m in moments.items()}
    for key, module in attention_outputs.items():
        output = means.pop(key[: -len(".weight")] + ".output", None)
        if output is None or key in means:  # never ran, or its projection was called as a layer (and seen)
            continue
        weight, bias = module.out_proj.weight.detach().double(), module.out_proj.bias.detach().double()
        solution = torch.linalg.lstsq(weight, (output - bias)[:, None]).solution[:, 0]
        # only where the projection determines its input (full column rank): then the solution is exact
        if torch.linalg.matrix_rank(weight) == weight.shape[1]:
            means[key] = solution
    return means


def lost_mean_shifts(slices: Sequence[ChannelSlice], means: Dict[str, Tensor], lost: Tensor) -> Dict[str, Tensor]:
    """For every consumer weight of a group whose input means are known: the change of its output's mean
    when each channel ``j`` loses the share ``lost[j]`` of its contribution (1: removed outright, 0: kept
    or merged whole), ``sum_j lost_j W[:, j] E[x_j]``, ``(out,)`` per weight key. Adding it to the
    consumer's bias keeps the output's mean."""
    shifts: Dict[str, Tensor] = {}
    for s in slices:
        if s.role != "consumer" or not s.is_feature or s.dim != 1 or s.key not in means:
            continue
        columns = s.per_output().double()  # (out, n, c * rest)
        n, c = s.positions.shape
        mean = means[s.key].to(columns.device)[s.positions.reshape(-1).to(columns.device)].reshape(n, c, 1)
        mean = mean.expand(n, c, columns.shape[2] // c).reshape(n, -1)
        shifts[s.key] = torch.einsum("onm,nm,n->o", columns, mean, lost.to(columns))
    return shifts
