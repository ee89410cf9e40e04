"""Channel groups of layers recognised by their attributes rather than read from the dependency graph:
the heads of ``nn.MultiheadAttention``, of packed-qkv (GPT-2), grouped key/value (LLaMA family, Phi),
interleaved (GPT-NeoX), sectioned (ModernBERT), split-qkv (Phi-3) and multi-query (GPT-BigCode) attention, and the neurons of gated MLPs with packed gate and up projections (Phi-3,
ModernBERT).
Torch-Pruning cannot follow their splits and reshapes; each layer's own attributes say which tensor rows
and columns hold a head's or a neuron's channels.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from lightning_intrafusion import (grouped_attention, interleaved_attention, multi_query_attention, packed_attention,
                                   packed_mlp, sectioned_attention, split_qkv_attention)
from lightning_intrafusion.attention import LAYOUTS as ATTENTION_LAYOUTS
from lightning_intrafusion.attention import Layout, parameter_slot, projection_width, section_positions
from lightning_intrafusion.fusion import ChannelSlice
from lightning_intrafusion.group import PrunableGroup
from lightning_intrafusion.surgery import output_dim


def attention_heads(name: str, module: nn.MultiheadAttention) -> PrunableGroup:
    """The projection channels of an attention layer, in units of whole heads: query, key and value
    rows produce them, the output projection's columns consume them."""
    width = projection_width(module)
    slices, targets = [], {}
    for key, target, made in attention_slices(name, module, ATTENTION_LAYOUTS["heads"],
                                               lambda copies: section_positions(width, copies)):
        slices.append(made)
        targets[key] = target
    return PrunableGroup(name, width, slices, [], [name], [name, f"{name}.out_proj"], unit=module.head_dim,
                         targets=targets, layers=[(module, "heads", section_positions(width, 1))], root_module=module)


def _packed_attention_heads(name: str, module: nn.Module) -> PrunableGroup:
    """The projection channels of a packed-qkv attention layer (GPT-2's ``c_attn``/``c_proj``), in units
    of whole heads: the three sections of ``c_attn``'s outputs produce them, ``c_proj``'s inputs consume them."""
    width = module.split_size
    slices, targets = [], {}
    for key, target, made in attention_slices(name, module, packed_attention.layout(module, output_dim),
                                               lambda copies: section_positions(width, copies)):
        slices.append(made)
        targets[key] = target
    return PrunableGroup(name, width, slices, [], [f"{name}.c_attn"], [name, f"{name}.c_attn", f"{name}.c_proj"],
                         unit=module.head_dim, targets=targets,
                         layers=[(module, packed_attention.SIDE, section_positions(width, 1))], root_module=module.c_attn)


def _grouped_attention_heads(name: str, module: nn.Module) -> PrunableGroup:
    """The query channels of an attention layer with grouped key/value heads, in units of one key/value
    head and its query heads: the query, key and value projections produce them (every query channel
    reads the key/value channel it attends with), the output projection's columns consume them."""
    out_name = grouped_attention.output_projection(module)
    parts = [("q_proj", "query", "producer"), ("k_proj", "key_value", "producer"),
             ("v_proj", "key_value", "producer"), (out_name, "query", "consumer")]
    group = _linear_layers_group(name, module, parts, grouped_attention.positions(module), grouped_attention.unit(module))
    group.head_size = module.head_dim
    group.unsupported = grouped_attention.norm_across_heads(module)
    return group


def _interleaved_attention_heads(name: str, module: nn.Module) -> PrunableGroup:
    """The projection channels of an attention layer whose heads' query, key and value rows lie together
    in one projection (GPT-NeoX), in units of whole heads: those rows produce them, ``dense`` consumes them."""
    parts = [("query_key_value", "query_key_value", "producer"), ("dense", "dense", "consumer")]
    return _linear_layers_group(name, module, parts, interleaved_attention.positions(module), module.head_size)


def _sectioned_attention_heads(name: str, module: nn.Module) -> PrunableGroup:
    """The projection channels of an attention layer whose ``Wqkv`` holds all queries, keys and values in
    three sections (ModernBERT), in units of whole heads: a row of each section produces a channel, a
    column of ``Wo`` consumes it."""
    parts = [("Wqkv", "Wqkv", "producer"), ("Wo", "Wo", "consumer")]
    return _linear_layers_group(name, module, parts, sectioned_attention.positions(module), module.head_dim)


def _split_qkv_attention_heads(name: str, module: nn.Module) -> PrunableGroup:
    """The query channels of an attention layer whose ``qkv_proj`` holds the query, key and value heads in three
    sections of their own sizes (Phi-3), in units of one key/value head and its query heads: a row of each
    section produces a channel, a column of ``o_proj`` consumes it."""
    parts = [("qkv_proj", "qkv_proj", "producer"), ("o_proj", "o_proj", "consumer")]
    group = _linear_layers_group(name, module, parts, split_qkv_attention.positions(module), split_qkv_attention.unit(module))
    group.head_size, group.counts = module.head_dim, split_qkv_attention.COUNTS
    return group


def _multi_query_attention_heads(name: str, module: nn.Module) -> PrunableGroup:
    """The query channels of a multi-query attention layer (GPT-BigCode), in units of one query head: the query
    rows of ``c_attn`` produce them, the columns of ``c_proj`` consume them; the shared key/value head stays."""
    parts = [("c_attn", "query", "producer"), ("c_proj", "query", "consumer")]
    group = _linear_layers_group(name, module, parts, multi_query_attention.positions(module), module.head_dim)
    group.counts = multi_query_attention.COUNTS
    return group


def _packed_mlp_neurons(name: str, module: nn.Module, names: Tuple[str, str]) -> PrunableGroup:
    """The neurons of a gated MLP with packed gate and up projections: each produced by two rows of the
    packed projection (``names[0]``: its gate and its up row), consumed by a column of the down projection."""
    packed, down = names
    parts = [(packed, packed, "producer"), (down, down, "consumer")]
    return _linear_layers_group(name, module, parts, packed_mlp.positions(module, names))


# layers recognised by their attributes: (recognise, the projections whose channels they own (the first
# must have been traced), build the group); groups are listed in this order
RECOGNISED: Tuple[Tuple[Callable[[nn.Module], bool], Tuple[str, ...], Callable[[str, nn.Module], PrunableGroup]], ...] = (
    (packed_attention.is_packed_attention, ("c_attn",), _packed_attention_heads),
    (grouped_attention.is_grouped_attention, ("q_proj", "k_proj", "v_proj"), _grouped_attention_heads),
    (interleaved_attention.is_interleaved_attention, ("query_key_value",), _interleaved_attention_heads),
    (sectioned_attention.is_sectioned_attention, ("Wqkv",), _sectioned_attention_heads),
    (split_qkv_attention.is_split_qkv_attention, ("qkv_proj",), _split_qkv_attention_heads),
    (multi_query_attention.is_multi_query_attention, ("c_attn",), _multi_query_attention_heads),
) + tuple((partial(packed_mlp.is_packed_gated_mlp, names=names), names[:1], partial(_packed_mlp_neurons, names=names))
          for names in packed_mlp.LAYER_NAMES)


def _linear_layers_group(name: str, module: nn.Module, parts: Sequence[Tuple[str, str, str]],
                         where: Dict[str, torch.Tensor], unit: int = 1) -> PrunableGroup:
    """A group of channels that ``nn.Linear`` children of ``module`` produce (output rows and biases) and
    consume (input columns): ``parts`` lists (child, key of its positions in ``where``, role); the first
    child is the group's root. Removal is plain layer pruning, replayed like any other."""
    slices, targets, layers = [], {}, []
    for layer_name, kind, role in parts:
        layer = getattr(module, layer_name)
        for leaf in ("weight", "bias") if role == "producer" else ("weight",):
            if getattr(layer, leaf, None) is None:
                continue
            key = f"{name}.{layer_name}.{leaf}"
            dim = 1 if role == "consumer" else 0
            slices.append(ChannelSlice(key, getattr(layer, leaf), dim, where[kind], role, is_feature=leaf == "weight"))
            targets[key] = (layer, leaf)
        layers.append((layer, "out" if role == "producer" else "in", where[kind]))
    producers = [f"{name}.{layer_name}" for layer_name, _, role in parts if role == "producer"]
    root = getattr(module, parts[0][0])
    return PrunableGroup(producers[0], len(where[parts[0][1]]), slices, [], producers,
                         [f"{name}.{layer_name}" for layer_name, _, _ in parts], unit=unit, targets=targets,
                         layers=layers, root_module=root)


def attention_slices(name: str, module: nn.Module, layout: Layout,
                      positions: Callable[[int], torch.Tensor]) -> List[Tuple[str, Tuple[nn.Module, str], ChannelSlice]]:
    """(key, (owner, attribute), slice) of every tensor of an attention layer that ``layout`` places
    channels in (see :data:`~lightning_intrafusion.attention.LAYOUTS`); ``positions(copies)`` places them."""
    out = []
    for attr, (dim, copies, role) in layout.items():
        owner, leaf = parameter_slot(module, attr)
        tensor = getattr(owner, leaf, None)
        if tensor is not None:
            key = f"{name}.{attr}"
            out.append((key, (owner, leaf), ChannelSlice(key, tensor, dim, positions(copies), role, attr.endswith("weight"))))
    return out
