"""Channel importance criteria: which channels of a group are kept (the support of the fusion)."""

from __future__ import annotations

from typing import Any, Union

import torch_pruning as tp

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


def needs_gradients(importance: Any) -> bool:
    return isinstance(importance, tp.importance.GroupTaylorImportance)
