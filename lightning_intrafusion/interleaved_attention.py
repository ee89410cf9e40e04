"""Heads of attention layers that pack each head's query, key and value rows together in one projection
(GPT-NeoX / Pythia's ``query_key_value``).

Such a layer views ``query_key_value(x)`` as ``(..., heads, 3 * head_size)`` and chunks the last dim into
query, key and value: head ``h`` owns rows ``h * 3 * head_size ...`` of the projection (its query, key
and value rows, in that order) and columns ``h * head_size ...`` of the output projection ``dense``. The
head count follows from the width (the ``-1`` of the view), so removing those rows and columns is the
whole surgery (plain layer removals). The dependency graph cannot follow the view and chunk; these
layers are recognised by their attributes instead: a layer that also holds its head count as an
attribute (Bloom's ``num_heads``, Falcon's) may read it in its forward, and is left to the graph.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn


def is_interleaved_attention(module: nn.Module) -> bool:
    """An ``nn.Linear`` ``query_key_value`` three times as wide as the inputs of the ``nn.Linear``
    ``dense``, whole heads of ``head_size`` channels, and no head-count attribute."""
    qkv, dense, head_size = (getattr(module, name, None) for name in ("query_key_value", "dense", "head_size"))
    if not (isinstance(qkv, nn.Linear) and isinstance(dense, nn.Linear) and isinstance(head_size, int) and head_size > 0):
        return False
    if any(isinstance(getattr(module, name, None), int) for name in ("num_heads", "num_attention_heads", "n_head")):
        return False
    return qkv.out_features == 3 * dense.in_features and dense.in_features % head_size == 0


def positions(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``(channels, c)`` positions of every projection channel (head ``h``, dimension ``j``): its query,
    key and value rows in ``query_key_value``, its column in ``dense``."""
    channels = torch.arange(module.dense.in_features)
    d = module.head_size
    query = (channels // d) * 3 * d + channels % d
    return {"query_key_value": torch.stack([query, query + d, query + 2 * d], dim=1), "dense": channels[:, None]}
