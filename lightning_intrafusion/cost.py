"""Size and compute of a model: parameters and multiply-accumulates (MACs) per sample.

MACs are counted with forward hooks on the model itself (no copy, so a LightningModule's Trainer is
never duplicated): convolutions, transposed convolutions, linear layers (also Hugging Face's
``Conv1D``) and ``nn.MultiheadAttention``
(its projections and attention products), which dominate compute.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch import nn

from lightning_intrafusion.attention import projection_width
from lightning_intrafusion.execution import eager, eval_forward
from lightning_intrafusion.surgery import transposed_linear_types


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else []
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    return 1


def _attention_macs(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> int:
    """Projections, scores, weighted values and output projection of one attention call."""
    width = projection_width(module)
    if query.dim() == 2:  # unbatched
        batch, seq = 1, 0
    else:
        batch, seq = (query.shape[0], 1) if module.batch_first else (query.shape[1], 0)
    tgt, src = query.shape[seq], key.shape[seq]
    projections = tgt * query.shape[-1] + src * key.shape[-1] + src * value.shape[-1] + tgt * module.embed_dim
    return int(batch * width * (projections + 2 * tgt * src))


def count_macs_and_params(model: nn.Module, example_inputs: Any) -> Tuple[int, int]:
    """MACs of one forward pass per sample of ``example_inputs``, and the number of parameters."""
    with eager(model) as plain:  # compiled code may bypass the counting hooks
        return _count(plain, example_inputs)


def _count(model: nn.Module, example_inputs: Any) -> Tuple[int, int]:
    total: List[int] = [0]

    def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if isinstance(module, nn.MultiheadAttention):
            total[0] += _attention_macs(module, *(list(args) + [kwargs.get(k) for k in ("query", "key", "value")][len(args):]))
            return
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
        elif isinstance(module, transposed_linear_types()):
            total[0] += output.numel() * module.weight.shape[0]

    kinds = (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention) + transposed_linear_types()
    eval_forward(model, example_inputs,
                 [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, kinds)])
    macs = total[0] // max(1, _batch_size(example_inputs))
    return int(macs), int(sum(p.numel() for p in model.parameters()))
