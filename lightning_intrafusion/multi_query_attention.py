"""Query heads of multi-query attention, where every query head attends with one shared key/value head
(GPT-BigCode / StarCoder's ``c_attn`` with ``multi_query``).

Such a layer splits ``c_attn(x)`` into ``embed_dim`` query channels and one head's key and value channels
(``head_dim`` each), repeats the key/value head ``num_key_value_groups`` times (once per query head) and
projects the concatenated query heads with ``c_proj``. A query head owns its ``head_dim`` rows of the query
section of ``c_attn`` and the same columns of ``c_proj``; the shared key/value head stays whole. The forward
reads the split and the repeat from its attributes, so ``embed_dim``, ``split_size``, ``num_heads`` and
``num_key_value_groups`` shrink with the removed heads. The dependency graph cannot follow the split; these
layers are recognised by their attributes instead.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

# attributes that count the query heads or their channels, which the forward reads (besides ``num_heads``)
COUNTS: Tuple[str, ...] = ("num_key_value_groups", "embed_dim", "split_size")


def is_multi_query_attention(module: nn.Module) -> bool:
    """``multi_query`` set, one key/value head (``kv_heads``), ``nn.Linear`` ``c_attn`` with ``embed_dim`` query
    outputs and one head's key and value outputs, and ``nn.Linear`` ``c_proj`` reading the ``num_heads`` query
    heads of ``head_dim`` channels, repeated ``num_key_value_groups`` times."""
    qkv, out = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    sizes = [getattr(module, name, None) for name in ("embed_dim", "head_dim", "num_heads", "kv_heads", "num_key_value_groups")]
    if not (getattr(module, "multi_query", False) is True and isinstance(qkv, nn.Linear) and isinstance(out, nn.Linear)
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes)):
        return False
    embed_dim, head_dim, heads, kv_heads, groups = sizes
    return (kv_heads == 1 and groups == heads and heads * head_dim == embed_dim == out.in_features
            and qkv.out_features == embed_dim + 2 * head_dim)


def positions(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``(query channels, 1)`` positions of every query channel: its row in ``c_attn`` and its column in
    ``c_proj`` (the same index: the queries come first)."""
    return {"query": torch.arange(module.embed_dim)[:, None]}
