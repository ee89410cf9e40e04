"""Heads of attention layers whose one projection holds all query heads, then the key heads, then the value
heads of grouped key/value attention, split at an offset the forward reads from the model's config
(Phi-3's ``qkv_proj``).

Such a layer computes ``qkv = qkv_proj(x)``, takes the first ``config.num_attention_heads * head_dim``
channels as queries, the next ``num_key_value_heads * head_dim`` as keys and the rest as values, and
projects the concatenated query heads with ``o_proj``; every ``num_key_value_groups`` consecutive query
heads attend with one key/value head. The unit kept, removed or merged is therefore one key/value head with
its query heads: their rows in each of the three sections of ``qkv_proj`` and their columns of ``o_proj``
(plain layer removals). The head counts shrink with them: the layer's own ``num_key_value_heads``, and
its config's ``num_attention_heads`` (and ``num_key_value_heads``), which the layer first gets a copy of,
since every layer of the model shares one config object. The dependency graph cannot follow the split;
these layers are recognised by their attributes instead.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from lightning_intrafusion.grouped_attention import key_value_channels

# head counts of the layer's config that follow its pruning (the forward reads the first)
COUNTS: Tuple[str, ...] = ("config.num_attention_heads", "config.num_key_value_heads")


def is_split_qkv_attention(module: nn.Module) -> bool:
    """``nn.Linear`` ``qkv_proj`` and ``o_proj``, ``head_dim``, ``num_key_value_heads`` and
    ``num_key_value_groups`` attributes and a ``config.num_attention_heads`` that agree with the projections'
    widths: ``qkv_proj`` has (query heads + 2 x key/value heads) x ``head_dim`` outputs, ``o_proj`` reads the
    query heads, and query heads = key/value heads x groups."""
    qkv, out = getattr(module, "qkv_proj", None), getattr(module, "o_proj", None)
    sizes = [getattr(module, name, None) for name in ("head_dim", "num_key_value_heads", "num_key_value_groups")]
    sizes.append(getattr(getattr(module, "config", None), "num_attention_heads", None))
    if not (isinstance(qkv, nn.Linear) and isinstance(out, nn.Linear)
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes)):
        return False
    head_dim, kv_heads, groups, heads = sizes
    return (heads == kv_heads * groups and out.in_features == heads * head_dim
            and qkv.out_features == (heads + 2 * kv_heads) * head_dim)


def unit(module: nn.Module) -> int:
    """Channels kept or removed together: the query heads sharing one key/value head."""
    return module.num_key_value_groups * module.head_dim


def positions(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``(query channels, c)`` positions of every query channel: its query row in ``qkv_proj`` and the rows of
    the key and value channel it attends with (``"qkv_proj"``), its column in ``o_proj`` (``"o_proj"``)."""
    width, head_dim = module.o_proj.in_features, module.head_dim
    channels = torch.arange(width)
    key_value = key_value_channels(width, head_dim, module.num_key_value_groups)
    keys_width = module.num_key_value_heads * head_dim
    return {"qkv_proj": torch.stack([channels, width + key_value, width + keys_width + key_value], dim=1),
            "o_proj": channels[:, None]}
