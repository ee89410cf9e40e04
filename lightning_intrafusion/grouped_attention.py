"""Heads of attention layers with separate query/key/value/output projections and grouped key/value
heads (Hugging Face LLaMA, Mistral, Qwen2: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``head_dim``,
``num_key_value_groups``; Phi names the output projection ``dense``), or one key/value head per query head
with rotary embeddings and no ``num_key_value_groups`` (GPT-J: ``out_proj``, ``rotary_dim``).

Rotary position embeddings slice and re-concatenate each head's dimensions, which the dependency graph
cannot follow (with grouped key/value heads its search never ends), but they act within a head: whole
heads can go. Every ``num_key_value_groups`` consecutive query heads share one key/value head, so the
unit kept, removed or merged is such a group of query heads together with its key/value head. The
layer's forward reads the head count from the projections' widths, so removing their rows and
``o_proj``'s columns is the whole surgery (plain layer removals, replayed like any other).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

OUTPUT_PROJECTIONS = ("o_proj", "dense", "out_proj")  # LLaMA family; Phi; GPT-J
ROTARY = ("rotary_dim", "rotary_ndims", "rotary_emb")  # attributes of layers that rotate their queries and keys


def output_projection(module: nn.Module) -> Optional[str]:
    """The attribute name of the layer's output projection (an ``nn.Linear``), or None."""
    return next((name for name in OUTPUT_PROJECTIONS if isinstance(getattr(module, name, None), nn.Linear)), None)


def is_grouped_attention(module: nn.Module) -> bool:
    """Separate ``nn.Linear`` query/key/value/output projections, ``head_dim`` and ``num_key_value_groups``
    consistent with their widths (query heads = key/value heads x groups); a layer with rotary embeddings and
    no ``num_key_value_groups`` has one key/value head per query head (the graph cannot follow the rotation's
    slices either way; without rotary embeddings such a layer is left to the graph)."""
    out_name = output_projection(module)
    layers = [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    head_dim, groups = getattr(module, "head_dim", None), key_value_groups(module)
    if (out_name is None or not all(isinstance(layer, nn.Linear) for layer in layers)
            or not isinstance(head_dim, int) or not isinstance(groups, int)):
        return False
    layers.append(getattr(module, out_name))
    q, k, v, o = layers
    return (head_dim > 0 and groups > 0 and k.out_features == v.out_features and k.out_features % head_dim == 0
            and q.out_features == groups * k.out_features == o.in_features)


def norm_across_heads(module: nn.Module) -> Optional[str]:
    """Why the heads cannot be pruned exactly, if a query or key norm normalises all heads' channels together
    (OLMo-2's ``q_norm``/``k_norm`` over the whole projection: removing a head changes the others'
    normalisation); None for a norm per head (Qwen3's, ``head_dim`` wide) or none."""
    for name, projection in (("q_norm", module.q_proj), ("k_norm", module.k_proj)):
        norm = getattr(module, name, None)
        if isinstance(norm, nn.Module) and any(p.numel() == projection.out_features != module.head_dim
                                                for p in norm.parameters()):
            return (f"its {name} normalises all heads' {projection.out_features} channels together, so removing a "
                    "head would change the other heads' normalisation")
    return None


def key_value_groups(module: nn.Module) -> Optional[int]:
    """Query heads per key/value head: ``num_key_value_groups``, or 1 for a layer with rotary embeddings
    that does not say (GPT-J); None otherwise."""
    groups = getattr(module, "num_key_value_groups", None)
    if groups is None and any(getattr(module, name, None) is not None for name in ROTARY):
        return 1
    return groups


def unit(module: nn.Module) -> int:
    """Channels kept or removed together: the query heads sharing one key/value head."""
    return key_value_groups(module) * module.head_dim


def positions(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``(query channels, 1)`` positions of every query channel in the query/output projections
    (``"query"``) and in the key/value projections (``"key_value"``: the key/value channel it attends with)."""
    width = module.q_proj.out_features
    return {"query": torch.arange(width)[:, None],
            "key_value": key_value_channels(width, module.head_dim, key_value_groups(module))[:, None]}


def key_value_channels(width: int, head_dim: int, groups: int) -> torch.Tensor:
    """For each of ``width`` query channels, the key/value channel it attends with: query head ``h`` uses
    key/value head ``h // groups``, dimension for dimension."""
    channels = torch.arange(width)
    return (channels // head_dim // groups) * head_dim + channels % head_dim
