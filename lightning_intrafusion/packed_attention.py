"""Heads of attention layers that pack query, key and value into one projection (GPT-2's ``c_attn``).

Such a layer computes ``q, k, v = c_attn(x).split(split_size)``, attends per head of ``head_dim``
channels, and projects the concatenated heads with ``c_proj``. Head ``h`` owns channels
``h * head_dim ... (h + 1) * head_dim - 1`` of each of the three sections of ``c_attn``'s outputs and the
same channels of ``c_proj``'s inputs. The dependency graph cannot follow the split (it maps the three
sections onto ``c_proj`` beyond its width), so these layers are recognised by their attributes and
their heads handled here: which tensors hold a head's channels, in which sections.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_intrafusion.attention import Layout

SIDE = "packed_heads"  # removal record: (attention layer name, SIDE, projection channels)


def is_packed_attention(module: nn.Module) -> bool:
    """A self-attention layer with a packed ``c_attn`` (3 x ``split_size`` outputs), a ``c_proj`` and
    ``num_heads`` heads of ``head_dim`` channels (Hugging Face GPT-2 and its relatives)."""
    c_attn, c_proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    sizes = [getattr(module, attr, None) for attr in ("num_heads", "head_dim", "split_size")]
    if not (isinstance(c_attn, nn.Module) and isinstance(c_proj, nn.Module) and all(isinstance(s, int) for s in sizes)):
        return False
    if getattr(module, "is_cross_attention", False) or not isinstance(getattr(c_attn, "weight", None), torch.Tensor):
        return False
    num_heads, head_dim, split_size = sizes
    return num_heads * head_dim == split_size and 3 * split_size in c_attn.weight.shape


def layout(module: nn.Module, output_dim) -> Layout:
    """``{parameter: (dim, copies, role)}`` of the tensors holding a packed layer's projection channels,
    as :data:`~lightning_intrafusion.attention.LAYOUTS` (``output_dim(layer)``: the weight dim that indexes
    a layer's outputs)."""
    out = {"c_attn.weight": (output_dim(module.c_attn), 3, "producer"),
           "c_proj.weight": (1 - output_dim(module.c_proj), 1, "consumer")}
    if getattr(module.c_attn, "bias", None) is not None:
        out["c_attn.bias"] = (0, 3, "producer")
    return out
