"""Size and compute of a model: parameters and multiply-accumulates (MACs) per sample.

MACs are counted with forward hooks on the model itself (no copy, so a LightningModule's Trainer is
never duplicated): convolutions, transposed convolutions and linear layers, which dominate compute.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch import nn

from lightning_intrafusion.execution import call_model, preserved_modes


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else []
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    return 1


def count_macs_and_params(model: nn.Module, example_inputs: Any) -> Tuple[int, int]:
    """MACs of one forward pass per sample of ``example_inputs``, and the number of parameters."""
    total: List[int] = [0]

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(module, nn.modules.conv._ConvNd):
            kernel = 1
            for k in module.kernel_size:
                kernel *= k
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                x = args[0]
                total[0] += x.numel() * (module.out_channels // module.groups) * kernel
            else:
                total[0] += output.numel() * (module.in_channels // module.groups) * kernel
        elif isinstance(module, nn.Linear):
            total[0] += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with preserved_modes(model), torch.no_grad():
            call_model(model.eval(), example_inputs)
    finally:
        for h in handles:
            h.remove()
    macs = total[0] // max(1, _batch_size(example_inputs))
    return int(macs), int(sum(p.numel() for p in model.parameters()))
