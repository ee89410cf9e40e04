"""Physical removal of channels, and its replayable record.

All indices of one pruning step are decided on the unpruned graph and applied here in one pass,
once per (layer, side), so that no stale index mapping of the dependency graph (concat offsets
after an earlier removal) can misplace them. The record is a list of plain
``[module_name, side, indices]`` entries: JSON-able, and replaying it on a fresh model of the same
class rebuilds the pruned shapes (so ``load_state_dict`` works on pruned checkpoints).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch_pruning as tp
from torch import nn

from lightning_intrafusion.attention import SIDES as ATTENTION_SIDES
from lightning_intrafusion.attention import remove_channels as remove_attention_channels

# (module name, "out" | "in", indices), (parameter name, "dim<d>", indices), or (attention layer name,
# "heads" | "embed", projection or embedding channels)
Removal = Tuple[str, str, List[int]]

_PRUNERS = tp.DependencyGraph()  # only used as a registry of per-layer pruning functions


def pruning_function(module: nn.Module, side: str):
    pruner = _PRUNERS.get_pruner_of_module(module)
    if pruner is None:
        raise ValueError(f"no pruning function for {type(module).__name__}")
    return pruner.prune_out_channels if side == "out" else pruner.prune_in_channels


def merge_removals(entries: Sequence[Tuple[Any, str, Sequence[int]]], names: Dict[nn.Module, str]) -> List[Removal]:
    """Union of the indices removed from each (layer, pruning function); sides that share one
    function (norm layers, depthwise convs) are merged so that nothing is removed twice. Bare
    parameters come as (parameter name, "dim<d>", indices)."""
    merged: Dict[Tuple[Any, object], Tuple[Any, str, set]] = {}
    for target, side, idxs in entries:
        if isinstance(target, str) or side in ATTENTION_SIDES:
            key: Tuple[Any, object] = (target, side)
        else:
            fn = pruning_function(target, side)
            key = (id(target), getattr(fn, "__func__", fn))
        if key not in merged:
            merged[key] = (target, side, set())
        merged[key][2].update(int(i) for i in idxs)
    return [(t if isinstance(t, str) else names[t], side, sorted(idxs)) for t, side, idxs in merged.values() if idxs]


def apply_removals(model: nn.Module, removals: Sequence[Removal]) -> None:
    """Remove the listed channels (indices refer to the widths before this call)."""
    modules = dict(model.named_modules())
    for name, side, idxs in removals:
        if side.startswith("dim"):
            _prune_parameter(model, name, int(side[3:]), idxs)
            continue
        if side in ATTENTION_SIDES:
            remove_attention_channels(model, name, side, idxs)
            continue
        if name not in modules:
            raise ValueError(f"pruning history names a module {name!r} that the model does not have")
        module = modules[name]
        if side == "in" and is_grouped_conv(module):
            _prune_grouped_conv_inputs(module, idxs)
            continue
        pruning_function(module, side)(module, list(idxs))


def is_grouped_conv(module: nn.Module) -> bool:
    """A convolution with ``1 < groups`` that is not depthwise (each group sees several channels)."""
    return (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups > 1
            and not module.groups == module.in_channels == module.out_channels)


def select_grouped_inputs(weight: torch.Tensor, groups: int, removed: Sequence[int]) -> torch.Tensor:
    """The weight ``(out, in / groups, *k)`` of a grouped conv without input channels ``removed``:
    every conv group keeps its own columns, so each must lose equally many channels."""
    per_group = weight.shape[1]
    drop: List[List[int]] = [[] for _ in range(groups)]
    for idx in removed:
        drop[int(idx) // per_group].append(int(idx) % per_group)
    if len({len(d) for d in drop}) != 1:
        raise ValueError(f"a grouped convolution must lose equally many input channels in each of its {groups} groups")
    rows = weight.shape[0] // groups
    parts = [weight[b * rows:(b + 1) * rows].index_select(
        1, torch.tensor(complement(per_group, drop[b]), dtype=torch.long, device=weight.device)) for b in range(groups)]
    return torch.cat(parts, 0)


def _prune_grouped_conv_inputs(conv: nn.Module, idxs: Sequence[int]) -> None:
    weight = conv.weight
    conv.weight = nn.Parameter(select_grouped_inputs(weight.data, conv.groups, idxs), requires_grad=weight.requires_grad)
    if weight.grad is not None:
        conv.weight.grad = select_grouped_inputs(weight.grad, conv.groups, idxs)
    conv.in_channels -= len(idxs)


def complement(size: int, idxs: Sequence[int]) -> List[int]:
    """The indices of ``range(size)`` not in ``idxs``, in order (the kept ones of a removal, or the
    removed ones of a selection)."""
    taken = set(int(i) for i in idxs)
    return [i for i in range(size) if i not in taken]


def parameter_owner(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    """The module holding parameter ``name`` (dotted, as in ``named_parameters``) and its attribute."""
    owner_name, _, attr = name.rpartition(".")
    return (model.get_submodule(owner_name) if owner_name else model), attr


def _prune_parameter(model: nn.Module, name: str, dim: int, idxs: Sequence[int]) -> None:
    owner, attr = parameter_owner(model, name)
    param = getattr(owner, attr, None)
    if not isinstance(param, nn.Parameter):
        raise ValueError(f"pruning history names a parameter {name!r} that the model does not have")
    keep = torch.tensor(complement(param.shape[dim], idxs), dtype=torch.long, device=param.device)
    setattr(owner, attr, nn.Parameter(param.data.index_select(dim, keep), requires_grad=param.requires_grad))


def replay_history(model: nn.Module, history: Sequence[Sequence[Removal]]) -> None:
    """Re-apply a sequence of pruning steps (each a list of removals) to a fresh, unpruned model."""
    for step in history:
        apply_removals(model, [(str(n), str(s), [int(i) for i in idxs]) for n, s, idxs in step])
