"""Layer-wise reconstruction with calibration data: after a pruning step, every pruned linear layer and
convolution is refit, in the order the forward pass calls them, to reproduce what the unpruned layer computed
(its kept outputs) from the inputs it now actually receives (least squares over the layer's input features,
im2col patches for a convolution, with a ridge toward the weights the step left). Each layer thereby also corrects what the layers before it lost,
which per-layer compensation from the unpruned model's statistics cannot (:mod:`~lightning_intrafusion.compensation`).

The unpruned layers' outputs on the calibration batches are recorded before the step (kept in memory), and the
refit takes one pass over the batches per layer.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_intrafusion.execution import call_model, preserved_modes

RIDGE = 1e-3  # relative to the mean diagonal of the features' Gram matrix, as linear compensation
MAX_FEATURES = 8192  # widest input (channels x kernel size) refit; wider layers keep what the step gave them


def refittable(module: nn.Module) -> bool:
    """A linear layer, or a 2-D convolution with one group and zero padding."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


def _features(layer: nn.Module) -> int:
    return layer.weight[0].numel()


@torch.no_grad()
def record_outputs(model: nn.Module, batches: Sequence[Any], names: Sequence[str]) -> Dict[str, List[Tensor]]:
    """The outputs of the named layers on every batch (the first call per batch), in the order the forward pass
    first calls them (the dict's order). The model runs in eval mode; modes are restored."""
    outputs: Dict[str, List[Tensor]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, Tensor) and len(outputs.setdefault(name, [])) == current[0]:
                outputs[name].append(output.detach())
        return record

    current = [0]
    hooks = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        with preserved_modes(model):
            model.eval()
            for current[0], batch in enumerate(batches):
                call_model(model, batch)
    finally:
        for handle in hooks:
            handle.remove()
    return outputs


@torch.no_grad()
def refit_layers(model: nn.Module, batches: Sequence[Any], targets: Dict[str, List[Tensor]],
                 kept_outputs: Dict[str, Tensor], ridge: float = RIDGE) -> List[str]:
    """Refit the layers of ``targets`` (unpruned outputs per batch, in call order) one after the other: each
    from its inputs in ``model`` as it is by then, to the unpruned outputs at ``kept_outputs[name]`` (all
    outputs where absent). Returns the names refit (layers that never ran or are too wide are left). The
    model runs in eval mode; modes are restored."""
    done = []
    with preserved_modes(model):
        model.eval()
        for name, wanted in targets.items():
            layer = model.get_submodule(name)
            if not refittable(layer) or _features(layer) > MAX_FEATURES or len(wanted) != len(batches):
                continue
            if _refit(model, layer, name, batches, wanted, kept_outputs.get(name), ridge):
                done.append(name)
    return done


def _refit(model: nn.Module, layer: nn.Module, name: str, batches: Sequence[Any], wanted: Sequence[Tensor],
           kept: Optional[Tensor], ridge: float) -> bool:
    gram: Any = 0.0
    cross: Any = 0.0
    inputs: List[Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    try:
        for batch, target in zip(batches, wanted):
            inputs.clear()
            call_model(model, batch)
            if not inputs:
                return False
            x = _input_features(layer, inputs[0])
            if layer.bias is not None:
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
            gram = gram + x.T @ x
            cross = cross + x.T @ _output_rows(layer, target, kept)
    finally:
        handle.remove()
    n = _features(layer)
    regulariser = torch.zeros_like(gram)
    regulariser.diagonal()[:n] = ridge * gram.diagonal()[:n].mean().clamp_min(torch.finfo(gram.dtype).tiny)
    # ridge toward the weights the step left (not toward zero): directions the calibration inputs do not
    # explore keep them, and a layer whose outputs are already right stays as it is
    prior = layer.weight.detach().reshape(layer.weight.shape[0], -1).T.to(gram)
    if layer.bias is not None:
        prior = torch.cat([prior, layer.bias.detach().to(gram)[None, :]], 0)
    solution = torch.linalg.solve(gram + regulariser, cross + regulariser @ prior)  # (features [+ 1], outputs)
    if not torch.isfinite(solution).all():
        raise ValueError(f"refitting layer {name!r} on calibration_data gave non-finite weights")
    layer.weight.data = solution[:n].T.reshape(layer.weight.shape).to(layer.weight)
    if layer.bias is not None:
        layer.bias.data = solution[n].to(layer.bias)
    return True


def _input_features(layer: nn.Module, x: Tensor) -> Tensor:
    if isinstance(layer, nn.Conv2d):
        patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
    return x.reshape(-1, x.shape[-1]).double()


def _output_rows(layer: nn.Module, y: Tensor, kept: Optional[Tensor]) -> Tensor:
    rows = y.movedim(1, -1).reshape(-1, y.shape[1]) if isinstance(layer, nn.Conv2d) else y.reshape(-1, y.shape[-1])
    if kept is not None:
        rows = rows[:, kept.to(rows.device)]
    return rows.double()
