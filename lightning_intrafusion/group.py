"""One prunable group: a set of coupled channels (kept or removed together across every layer they touch),
described as plain tensors, ready for importance, optimal transport and fusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from lightning_intrafusion.fusion import BatchNormFold, ChannelSlice
from lightning_intrafusion.surgery import transposed_linear_types


@dataclass
class PrunableGroup:
    """One set of coupled channels, ready for importance, OT and fusion."""

    root_name: str
    width: int
    slices: List[ChannelSlice]
    folds: List[BatchNormFold]
    producers: List[str]
    members: List[str]
    blocks: int = 1
    unit: int = 1  # channels that are only kept or removed together (the head size of attention heads)
    head_size: int = 0  # one head's channels where a unit holds several heads (grouped key/value heads)
    # further attributes of the attention layer that count its heads or channels and that its forward reads
    # (``config.num_attention_heads`` for Phi-3: the layer gets a copy of the config, which all layers share)
    counts: Tuple[str, ...] = ()
    hidden_heads: bool = False  # channels meet in a batched matmul of activations: heads of unseen size
    # channels are reshaped and their dims transposed outside attention: the graph may not follow a
    # channel permutation (a ShuffleNet channel shuffle), so the mapping is checked by a probe
    reordered: bool = False
    protected: Optional[str] = None  # why the group must not be pruned, if it must not
    unsupported: Optional[str] = None  # why it cannot be pruned exactly, if it cannot
    # keys of its slices of a parameter that several of its layers share (tied embeddings): that tensor's columns
    # are removed, never merged (its other tensors are fused)
    tied: Tuple[str, ...] = ()
    # the norm that feeds the tied output layer and nothing else, if one does: it makes up for the unmerged columns
    tied_norm: Optional[str] = None
    targets: Dict[str, Tuple[nn.Module, str]] = field(default_factory=dict, repr=False)
    # (layer, "out" | "in", positions), or (parameter name, "dim<d>", positions) for a bare parameter
    layers: List[Tuple[Any, str, torch.Tensor]] = field(default_factory=list, repr=False)
    tp_group: Any = field(default=None, repr=False)
    root_module: Optional[nn.Module] = field(default=None, repr=False)
    root_handler: Any = field(default=None, repr=False)

    @property
    def depthwise(self) -> bool:
        """Whether a depthwise convolution computes the channels from themselves (MobileNet-style
        expansion -> depthwise chains: each channel passes two nonlinear stages)."""
        return any(is_depthwise(layer) for layer, _, _ in self.layers)

    @property
    def scored_by_torch_pruning(self) -> bool:
        """Whether Torch-Pruning's importance criteria can score the group (they know neither the heads
        of ``nn.MultiheadAttention``, which have no Torch-Pruning group, nor Hugging Face's ``Conv1D``)."""
        kinds = transposed_linear_types()
        return self.tp_group is not None and not any(isinstance(layer, kinds) for layer, _, _ in self.layers)

    def refresh(self) -> None:
        """Point every slice at its tensor's current value (after another group was fused)."""
        for s in self.slices:
            module, attr = self.targets[s.key]
            s.tensor = getattr(module, attr)

    def removals(self, removed: torch.Tensor) -> List[Tuple[Any, str, List[int]]]:
        """(layer, side, indices) that removing the group channels ``removed`` takes."""
        return [(m, side, pos[removed].reshape(-1).tolist()) for m, side, pos in self.layers]


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.out_channels == module.in_channels
