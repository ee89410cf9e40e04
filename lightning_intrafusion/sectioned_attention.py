"""Heads of attention layers whose one projection holds all queries, then all keys, then all values
(ModernBERT's ``Wqkv``).

Such a layer views ``Wqkv(x)`` as ``(..., 3, heads, head_dim)``, with the head count left to the view
(``-1``), and projects the concatenated heads with ``Wo``: head ``h`` owns channels
``h * head_dim ... (h + 1) * head_dim - 1`` of each of the three sections of ``Wqkv``'s outputs and the
same columns of ``Wo``, so removing those rows and columns is the whole surgery (plain layer removals).
The dependency graph cannot follow the view; these layers are recognised by their attributes instead. A
layer that also holds its head count as an attribute (MPT's ``n_heads``) may read it in its forward,
and is left to the graph.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads", "n_head")


def is_sectioned_attention(module: nn.Module) -> bool:
    """An ``nn.Linear`` ``Wqkv`` three times as wide as the inputs of the ``nn.Linear`` ``Wo``, whole heads
    of ``head_dim`` channels, and no head-count attribute."""
    qkv, out, head_dim = (getattr(module, name, None) for name in ("Wqkv", "Wo", "head_dim"))
    if not (isinstance(qkv, nn.Linear) and isinstance(out, nn.Linear) and isinstance(head_dim, int) and head_dim > 0):
        return False
    if any(isinstance(getattr(module, name, None), int) for name in HEAD_COUNT_ATTRIBUTES):
        return False
    return qkv.out_features == 3 * out.in_features and out.in_features % head_dim == 0


def positions(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``(channels, c)`` positions of every projection channel: its query, key and value rows in ``Wqkv``
    (one per section), its column in ``Wo``."""
    channels = torch.arange(module.Wo.in_features)
    width = len(channels)
    return {"Wqkv": torch.stack([channels, channels + width, channels + 2 * width], dim=1), "Wo": channels[:, None]}
