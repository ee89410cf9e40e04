"""Attention heads of ``nn.MultiheadAttention`` as a prunable channel group.

``nn.MultiheadAttention`` ties the width of its query/key/value projections to the embedding width,
so it cannot lose a head. :class:`PrunableMultiheadAttention` is a drop-in subclass (same parameter
names, same forward signature and results) whose projection width is ``num_heads * head_dim``,
independent of ``embed_dim``. The pruner converts a ``nn.MultiheadAttention`` into it when, and only
when, it removes heads from it; its state dict then loads into a converted fresh model.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear


class PrunableMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with a projection width (``num_heads * head_dim``) of its own.

    ``num_heads`` follows from the parameters, so removing the rows of whole heads is all a pruning
    step needs to do. The query/key/value projections are packed in ``in_proj_weight``, or, for keys
    and values of other widths (``kdim``/``vdim``), held in ``q_proj_weight``/``k_proj_weight``/
    ``v_proj_weight``, as in ``nn.MultiheadAttention``.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: Optional[int] = None, dropout: float = 0.0,
                 bias: bool = True, add_bias_kv: bool = False, add_zero_attn: bool = False,
                 batch_first: bool = False, device=None, dtype=None) -> None:
        nn.Module.__init__(self)
        kw = {"device": device, "dtype": dtype}
        head_dim = embed_dim // num_heads if head_dim is None else head_dim
        inner = num_heads * head_dim
        self._init_attributes(embed_dim, head_dim, dropout, batch_first, add_zero_attn)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **kw))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **kw)) if bias else None
        self.out_proj = NonDynamicallyQuantizableLinear(inner, embed_dim, bias=bias, **kw)
        self.bias_k = nn.Parameter(torch.empty(1, 1, inner, **kw)) if add_bias_kv else None
        self.bias_v = nn.Parameter(torch.empty(1, 1, inner, **kw)) if add_bias_kv else None
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.out_proj.bias)
        for extra in (self.bias_k, self.bias_v):
            if extra is not None:
                nn.init.xavier_normal_(extra)

    def _init_attributes(self, embed_dim: int, head_dim: int, dropout: float, batch_first: bool,
                         add_zero_attn: bool, kdim: Optional[int] = None, vdim: Optional[int] = None) -> None:
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.head_dim = head_dim
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        # False keeps PyTorch's fused fast paths (TransformerEncoderLayer, MHA) away from this module
        self._qkv_same_embed_dim = False
        self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None

    @property
    def num_heads(self) -> int:  # type: ignore[override]
        return self.inner_dim // self.head_dim

    @property
    def inner_dim(self) -> int:
        """Width of the query/key/value projections, ``num_heads * head_dim``."""
        return self.projections()[0].shape[0]

    def projections(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The query, key and value projection weights."""
        if self.in_proj_weight is not None:
            return tuple(self.in_proj_weight.chunk(3))  # type: ignore[return-value]
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "PrunableMultiheadAttention":
        """The same layer, sharing ``module``'s parameter objects (so optimizers keep tracking them)."""
        if isinstance(module, cls):
            return module
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._init_attributes(module.embed_dim, module.head_dim, module.dropout, module.batch_first, module.add_zero_attn,
                             module.kdim, module.vdim)
        new.in_proj_weight = module.in_proj_weight
        if not module._qkv_same_embed_dim:
            new.q_proj_weight, new.k_proj_weight, new.v_proj_weight = (
                module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        new.in_proj_bias = module.in_proj_bias
        new.out_proj = module.out_proj
        new.bias_k = module.bias_k
        new.bias_v = module.bias_v
        new.train(module.training)
        return new

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, tgt, _ = query.shape
        h, d = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.projections()
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        mask = self._float_mask(attn_mask, key_padding_mask, batch, tgt, key.shape[1], q.dtype, is_causal)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], 1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], 1)
            mask = None if mask is None else F.pad(mask, (0, 1))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, 1, k.shape[2])], 1)
            v = torch.cat([v, v.new_zeros(batch, 1, v.shape[2])], 1)
            mask = None if mask is None else F.pad(mask, (0, 1))

        def heads(x: Tensor) -> Tensor:
            return x.reshape(batch, x.shape[1], h, d).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q / math.sqrt(d)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            out = F.dropout(weights, p) @ v
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = F.linear(out.transpose(1, 2).reshape(batch, tgt, h * d), self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _float_mask(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], batch: int, tgt: int,
                    src: int, dtype: torch.dtype, is_causal: bool) -> Optional[Tensor]:
        """One additive mask, broadcastable to ``(batch, heads, tgt, src)``, or None."""
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=self.in_proj_weight.device).triu(1)
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            mask = mask.reshape(batch, self.num_heads, tgt, src) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, dtype).reshape(batch, 1, 1, src)
            mask = pad if mask is None else mask + pad
        return mask


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def projection_width(module: nn.MultiheadAttention) -> int:
    """Width of the query/key/value projections of an attention layer (``num_heads * head_dim``)."""
    return module.inner_dim if isinstance(module, PrunableMultiheadAttention) else module.embed_dim


# Where each parameter of an attention layer holds the channels of each side: (dim, copies, role),
# the copies being the query, key and value blocks of the packed input projection. "heads": the
# projection channels (whole heads); "embed": the embedding channels the layer reads and writes.
# Graph description, removal and optimizer-state slicing all read this one table.
LAYOUTS: Dict[str, Dict[str, Tuple[int, int, str]]] = {
    "heads": {"in_proj_weight": (0, 3, "producer"), "q_proj_weight": (0, 1, "producer"),
              "k_proj_weight": (0, 1, "producer"), "v_proj_weight": (0, 1, "producer"),
              "in_proj_bias": (0, 3, "producer"), "bias_k": (2, 1, "producer"), "bias_v": (2, 1, "producer"),
              "out_proj.weight": (1, 1, "consumer")},
    "embed": {"in_proj_weight": (1, 1, "consumer"), "out_proj.weight": (0, 1, "producer"),
              "out_proj.bias": (0, 1, "producer")},
}
SIDES = tuple(LAYOUTS)


Layout = Dict[str, Tuple[int, int, str]]  # parameter -> (dim, copies, role), as in LAYOUTS


def parameter_slot(module: nn.Module, attr: str) -> Tuple[nn.Module, str]:
    """The module and attribute holding ``attr`` (``"out_proj.weight"`` lives on ``module.out_proj``)."""
    owner, _, leaf = attr.rpartition(".")
    return (module.get_submodule(owner) if owner else module), leaf


def section_positions(width: int, copies: int) -> Tensor:
    """``(width, copies)``: projection channel ``c`` sits at ``c + s * width`` in section ``s`` (the query,
    key and value sections of a packed projection, or one section)."""
    channels = torch.arange(width)
    return torch.stack([channels + s * width for s in range(copies)], dim=1)


def surviving_indices(attr: str, old_shape: Sequence[int], idxs: Sequence[int],
                      layout: Layout) -> Optional[Tuple[int, Tensor]]:
    """For parameter ``attr`` of a layer laid out as ``layout``, shaped ``old_shape`` before its channels
    ``idxs`` were removed (from every section): (dim, surviving indices), or None if ``attr`` holds none."""
    if attr not in layout:
        return None
    dim, copies, _ = layout[attr]
    width = old_shape[dim] // copies
    removed = set(int(i) for i in idxs)
    keep = torch.tensor([c for c in range(width) if c not in removed], dtype=torch.long)
    return dim, torch.cat([keep + s * width for s in range(copies)])
