"""Channel importance criteria: which channels of a group are kept (the support of the fusion)."""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
import torch_pruning as tp
from torch import Tensor

from lightning_intrafusion.fusion import ChannelSlice

IMPORTANCES = ("l1", "l2", "taylor", "lamp", "random", "fpgm", "bn_scale")

ImportanceLike = Union[str, tp.importance.Importance, Any]


def resolve_importance(importance: ImportanceLike) -> Any:
    """A Torch-Pruning importance object from a name, or a user object returned as is.

    A user object must be callable as ``importance(group) -> Tensor`` with one score per channel of
    the group's root (Torch-Pruning's ``Importance`` protocol).
    """
    if not isinstance(importance, str):
        if not callable(importance):
            raise TypeError(
                f"importance must be one of {list(IMPORTANCES)} or a callable importance(group) -> Tensor, "
                f"got {type(importance).__name__}"
            )
        return importance
    name = importance.lower()
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if name == "random":
        return tp.importance.RandomImportance()
    if name == "fpgm":
        return tp.importance.FPGMImportance(p=2)
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    raise ValueError(f"Unknown importance {importance!r}; expected one of {list(IMPORTANCES)} or an importance object")


_NAMED = (tp.importance.GroupMagnitudeImportance, tp.importance.GroupTaylorImportance, tp.importance.LAMPImportance,
          tp.importance.RandomImportance, tp.importance.FPGMImportance, tp.importance.BNScaleImportance)


def score_group(importance: Any, group: Any) -> Any:
    """One score per channel of a :class:`~lightning_intrafusion.group.PrunableGroup`: Torch-Pruning's
    criterion on its Torch-Pruning group where it can score it, the same criterion on the group's weight
    tensors where not; a user object always gets the Torch-Pruning group when there is one."""
    if group.tp_group is not None and (group.scored_by_torch_pruning or not isinstance(importance, _NAMED)):
        return importance(group.tp_group)
    return score_slices(importance, group.slices, group.root_name)


def needs_gradients(importance: Any) -> bool:
    return isinstance(importance, tp.importance.GroupTaylorImportance)


def score_slices(importance: Any, slices: Sequence[ChannelSlice], group_name: str) -> Tensor:
    """Scores of a group that Torch-Pruning's criteria cannot score (attention heads, packed projections,
    Hugging Face ``Conv1D`` layers), computed from its weight tensors with the same criterion as
    ``importance``."""
    features = [s for s in slices if s.is_feature]
    n = features[0].positions.shape[0]
    if isinstance(importance, tp.importance.RandomImportance):
        return torch.rand(n, dtype=torch.float64)
    if isinstance(importance, tp.importance.BNScaleImportance):
        raise ValueError(f"importance 'bn_scale' needs BatchNorm layers; group {group_name!r} has none")
    if isinstance(importance, tp.importance.GroupTaylorImportance):
        grads = [(s, getattr(s.tensor, "grad", None)) for s in features]
        if any(g is None for _, g in grads):
            raise ValueError(f"importance 'taylor' found no gradient on the weights of group {group_name!r}")
        return sum((s.rows() * s.rows(g)).abs().sum(1) for s, g in grads)
    if isinstance(importance, tp.importance.FPGMImportance):
        rows = torch.cat([s.rows() for s in features], dim=1)
        return torch.cdist(rows, rows, p=2).sum(1)
    if isinstance(importance, tp.importance.GroupMagnitudeImportance):  # l1, l2; LAMP ranks like l2
        p = float(getattr(importance, "p", 2))
        return sum(s.rows().abs().pow(p).sum(1) for s in features)
    raise TypeError(
        f"a custom importance is called with a Torch-Pruning group, and group {group_name!r} has none (its "
        f"layers were recognised by their attributes: attention heads or packed projections); use one of "
        f"{list(IMPORTANCES)} or exclude={[group_name]!r}"
    )
