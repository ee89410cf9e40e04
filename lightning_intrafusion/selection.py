"""What one pruning step prunes: which dependency groups (include/exclude globs, protected outputs,
refusals of what cannot be pruned exactly), and which channels of each group are kept (how many, in
indivisible blocks such as whole heads, and which by importance).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_intrafusion.graph import UnsupportedModelError, channel_mapping_holds, iter_groups, matches
from lightning_intrafusion.group import PrunableGroup
from lightning_intrafusion.report import UNSUPPORTED


def select_groups(
    graph: tp.DependencyGraph, include: Optional[Sequence[str]], exclude: Optional[Sequence[str]],
    channel_blocks: Mapping[str, int], on_unsupported: str = "raise", unresolved: Optional[Dict[str, str]] = None,
) -> Tuple[List[PrunableGroup], Dict[str, str]]:
    """Names of the groups to prune (validated, before anything is modified) and why others are not
    (``unresolved``: see :func:`~lightning_intrafusion.graph.iter_groups`)."""
    selected: List[PrunableGroup] = []
    skipped: Dict[str, str] = {}
    used = {g: False for g in list(include or []) + list(exclude or []) + list(channel_blocks)}
    for group in iter_groups(graph, unresolved):
        for pattern in used:
            if any(matches(name, [pattern]) for name in group.members):
                used[pattern] = True
        if group.protected:
            skipped[group.root_name] = group.protected
            continue
        if include is not None and not any(matches(p, include) for p in group.producers):
            skipped[group.root_name] = "not matched by include"
            continue
        if exclude and any(matches(m, exclude) for m in group.members):
            skipped[group.root_name] = "matched by exclude"
            continue
        if group.hidden_heads and not any(matches(p, [g]) for g in channel_blocks for p in group.producers):
            _refuse(group, "its channels meet in a matrix product of activations (attention written with explicit "
                           "matmuls?), whose head size the graph cannot see", on_unsupported, skipped,
                    advice=f"Pass channel_blocks={{{(group.producers or [group.root_name])[0]!r}: head_dim}} to prune "
                           "whole heads, or leave it out with exclude=[...]")
            continue
        if group.unsupported:
            _refuse(group, group.unsupported, on_unsupported, skipped)
            continue
        selected.append(group)
    unused = [p for p, hit in used.items() if not hit]
    if unused:
        kinds = sorted({type(m).__name__ for n, m in graph.model.named_modules() if n and matches(n, unused)})
        hint = f" (they match only modules of type {', '.join(kinds)}, none of them a prunable layer)" if kinds else ""
        raise ValueError(f"module-name globs matched no prunable layer: {unused}{hint}")
    return selected, skipped


def check_reordered_channels(model: nn.Module, example_inputs: Any, groups: Sequence[PrunableGroup],
                              on_unsupported: str, skipped: Dict[str, str]) -> List[PrunableGroup]:
    """Groups whose channels are reshaped and transposed (outside attention) are probed before anything
    is changed: the graph does not follow a channel permutation such as a ShuffleNet shuffle. Returns
    the groups that may be pruned."""
    kept = []
    for group in groups:
        if group.reordered and not channel_mapping_holds(model, example_inputs, group):
            _refuse(group, "its channels are reshaped and their order changed on the way to the next layer (a "
                           "channel shuffle?), which the dependency graph does not follow", on_unsupported, skipped)
        else:
            kept.append(group)
    return kept


def _refuse(group: PrunableGroup, reason: str, on_unsupported: str, skipped: Dict[str, str],
            advice: str = "Leave it out with exclude=[...] (module-name globs)") -> None:
    """Raise :class:`UnsupportedModelError` for a group that cannot be pruned exactly, or (``"skip"``)
    record it in ``skipped``."""
    if on_unsupported == "raise":
        raise UnsupportedModelError(f"cannot prune the channel group of {group.root_name!r}: {reason}. {advice}.")
    skipped[group.root_name] = UNSUPPORTED + reason


def block_size(group: PrunableGroup, channel_blocks: Mapping[str, int]) -> int:
    sizes = {int(size) for pattern, size in channel_blocks.items() if any(matches(p, [pattern]) for p in group.producers)}
    if len(sizes) > 1:
        raise ValueError(f"conflicting channel_blocks sizes {sorted(sizes)} for group {group.root_name!r}")
    unit = sizes.pop() if sizes else group.unit
    if unit % group.unit:
        raise ValueError(f"channel_blocks size {unit} of group {group.root_name!r} is not a multiple of its "
                         f"head size {group.unit}")
    if unit < 1 or group.width % unit:
        raise ValueError(f"channel_blocks size {unit} does not divide the width {group.width} of group {group.root_name!r}")
    return unit


def kept_width(group: PrunableGroup, sparsity: float, reference: Optional[int], unit: int) -> int:
    """Channels to keep: ``round((1 - sparsity) * reference)``, at least one per norm block and unit,
    a multiple of both, never more than now."""
    step = group.blocks * unit
    base = group.width if reference is None else int(reference)
    keep = int(round((1.0 - sparsity) * base / step)) * step
    return min(group.width, max(step, keep))


def choose_kept(scores: Tensor, keep: int, blocks: int, unit: int) -> Tensor:
    """Indices (in units) of the kept units: the top scores, equally many in each norm block."""
    unit_scores = scores.reshape(-1, unit).sum(1)
    per_block = len(unit_scores) // blocks
    keep_units = keep // unit // blocks
    kept = []
    for b in range(blocks):
        block = unit_scores[b * per_block:(b + 1) * per_block]
        # stable sort: ties resolve to the lower index, so the choice is deterministic
        order = torch.sort(-block, stable=True).indices[:keep_units]
        kept.append(torch.sort(order).values + b * per_block)
    return torch.cat(kept)
