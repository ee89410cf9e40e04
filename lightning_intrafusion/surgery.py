"""Physical removal of channels, and its replayable record.

All indices of one pruning step are decided on the unpruned graph and applied here in one pass,
once per (layer, side), so that no stale index mapping of the dependency graph (concat offsets
after an earlier removal) can misplace them. The record is a list of plain
``[module_name, side, indices]`` entries: JSON-able, and replaying it on a fresh model of the same
class rebuilds the pruned shapes (so ``load_state_dict`` works on pruned checkpoints).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch_pruning as tp
from torch import nn

Removal = Tuple[str, str, List[int]]  # (module name, "out" | "in", indices)

_PRUNERS = tp.DependencyGraph()  # only used as a registry of per-layer pruning functions


def pruning_function(module: nn.Module, side: str):
    pruner = _PRUNERS.get_pruner_of_module(module)
    if pruner is None:
        raise ValueError(f"no pruning function for {type(module).__name__}")
    return pruner.prune_out_channels if side == "out" else pruner.prune_in_channels


def merge_removals(entries: Sequence[Tuple[nn.Module, str, Sequence[int]]], names: Dict[nn.Module, str]) -> List[Removal]:
    """Union of the indices removed from each (layer, pruning function); sides that share one
    function (norm layers, depthwise convs) are merged so that nothing is removed twice."""
    merged: Dict[Tuple[int, object], Tuple[nn.Module, str, set]] = {}
    for module, side, idxs in entries:
        fn = pruning_function(module, side)
        key = (id(module), getattr(fn, "__func__", fn))
        if key not in merged:
            merged[key] = (module, side, set())
        merged[key][2].update(int(i) for i in idxs)
    return [(names[m], side, sorted(idxs)) for m, side, idxs in merged.values() if idxs]


def apply_removals(model: nn.Module, removals: Sequence[Removal]) -> None:
    """Remove the listed channels (indices refer to the widths before this call)."""
    modules = dict(model.named_modules())
    for name, side, idxs in removals:
        if name not in modules:
            raise ValueError(f"pruning history names a module {name!r} that the model does not have")
        pruning_function(modules[name], side)(modules[name], list(idxs))


def replay_history(model: nn.Module, history: Sequence[Sequence[Removal]]) -> None:
    """Re-apply a sequence of pruning steps (each a list of removals) to a fresh, unpruned model."""
    for step in history:
        apply_removals(model, [(str(n), str(s), [int(i) for i in idxs]) for n, s, idxs in step])
