"""Carry optimizer state across a pruning step: new parameters get the old state (momentum, Adam
moments) sliced to the channels that were kept, matched by parameter name."""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn

from lightning_intrafusion import packed_attention
from lightning_intrafusion.attention import LAYOUTS as ATTENTION_LAYOUTS
from lightning_intrafusion.attention import SIDES as ATTENTION_SIDES
from lightning_intrafusion.attention import surviving_indices
from lightning_intrafusion.execution import eager
from lightning_intrafusion.surgery import COUNT, complement, is_grouped_conv, output_dim, select_grouped_inputs


def kept_indices(old_shape: Sequence[int], new_shape: Sequence[int], removals: Sequence[Tuple[str, str, List[int]]],
                 module_name: str, out_dim: int = 0) -> Dict[int, Tensor]:
    """For each dim that shrank, the indices (in the old tensor) that survive; ``out_dim`` is the
    dimension of the tensor that indexes the layer's output channels."""
    mine = [(side, idxs) for name, side, idxs in removals if name == module_name and not side.startswith(COUNT)]
    out: Dict[int, Tensor] = {}
    for dim, (a, b) in enumerate(zip(old_shape, new_shape)):
        if a == b:
            continue
        # a bare parameter records its dim; for a layer, the "out" side is ``out_dim`` and the "in"
        # side the other one
        explicit = [idxs for side, idxs in mine if side == f"dim{dim}"]
        candidates = [idxs for side, idxs in mine if len(idxs) == a - b]
        preferred = [idxs for side, idxs in mine if len(idxs) == a - b and (side == "out") == (dim == out_dim)]
        chosen = (explicit or preferred or candidates or [None])[0]
        if chosen is None:
            raise ValueError(f"cannot tell which channels of {module_name} dim {dim} were kept")
        out[dim] = torch.tensor(complement(a, chosen), dtype=torch.long)
    return out


def slice_state(value: Tensor, kept: Mapping[int, Tensor]) -> Tensor:
    for dim, idx in kept.items():
        value = value.index_select(dim, idx.to(value.device))
    return value


def snapshot_optimizer_state(optimizers: Sequence[torch.optim.Optimizer], module: nn.Module) -> Dict[str, dict]:
    """``{parameter name: {state key: tensor}}`` of every optimizer, plus the parameter's shape (names
    of the uncompiled module, as pruning records them)."""
    with eager(module) as plain:
        names = {id(p): n for n, p in plain.named_parameters()}
    out: Dict[str, dict] = {}
    for opt in optimizers:
        for p, state in opt.state.items():
            if id(p) in names:
                out[names[id(p)]] = {"shape": tuple(p.shape), "state": dict(state)}
    return out


def restore_optimizer_state(optimizers: Sequence[torch.optim.Optimizer], module: nn.Module,
                            saved: Mapping[str, dict], removals: Sequence[Tuple[str, str, List[int]]]) -> int:
    """Put the saved state on the new parameters, sliced to their kept channels. Returns how many
    parameters got their state back."""
    with eager(module) as plain:
        params = dict(plain.named_parameters())
        modules = dict(plain.named_modules())
    restored = 0
    for opt in optimizers:
        owned = {id(p) for g in opt.param_groups for p in g["params"]}
        for name, entry in saved.items():
            p = params.get(name)
            if p is None or id(p) not in owned:
                continue
            select = _selector(name, entry["shape"], tuple(p.shape), removals, modules)
            new_state = {}
            for key, value in entry["state"].items():
                if isinstance(value, Tensor) and tuple(value.shape) == entry["shape"]:
                    new_state[key] = select(value).clone()
                else:
                    new_state[key] = value.clone() if isinstance(value, Tensor) else value
            opt.state[p] = new_state
            restored += 1
    return restored


def _selector(name: str, old_shape: Tuple[int, ...], new_shape: Tuple[int, ...],
              removals: Sequence[Tuple[str, str, List[int]]], modules: Mapping[str, nn.Module]) -> Callable[[Tensor], Tensor]:
    """How a tensor shaped like parameter ``name`` before the step becomes one shaped like it after."""
    bare = any(r[0] == name and r[1].startswith("dim") for r in removals)
    module_name = name if bare else (name.rsplit(".", 1)[0] if "." in name else "")
    layer = modules.get(module_name)
    heads = _attention_kept(name, old_shape, removals, modules)
    if heads:  # another dim (a packed layer's hidden width) may have shrunk too, by a removal of the layer itself
        rest_shape = tuple(old if dim in heads else new for dim, (old, new) in enumerate(zip(old_shape, new_shape)))
        rest = kept_indices(old_shape, rest_shape, removals, module_name,
                            output_dim(layer) if layer is not None and len(old_shape) > 1 else 0)
        return lambda value: slice_state(value, {**rest, **heads})
    grouped_inputs = [idxs for n, side, idxs in removals if n == module_name and side == "in"]
    if layer is not None and is_grouped_conv(layer) and name.endswith("weight") and grouped_inputs:
        # output rows first (an index_select), then each conv group's own input columns
        rows_only = kept_indices(old_shape, (new_shape[0],) + old_shape[1:], removals, module_name)
        return lambda value: select_grouped_inputs(slice_state(value, rows_only), layer.groups, grouped_inputs[0])
    out_dim = output_dim(layer) if layer is not None and name.endswith("weight") and len(old_shape) > 1 else 0
    kept = kept_indices(old_shape, new_shape, removals, module_name, out_dim)
    return lambda value: slice_state(value, kept)


def _attention_kept(name: str, old_shape: Sequence[int], removals: Sequence[Tuple[str, str, List[int]]],
                    modules: Mapping[str, nn.Module]) -> Dict[int, Tensor]:
    """Surviving indices (by dim) of a parameter of an attention layer that lost heads or embedding
    channels (``nn.MultiheadAttention``) or heads (a packed-qkv layer)."""
    kept: Dict[int, Tensor] = {}
    for module_name, side, idxs in removals:
        if not name.startswith(module_name + "."):
            continue
        if side in ATTENTION_SIDES:
            layout = ATTENTION_LAYOUTS[side]
        elif side == packed_attention.SIDE and module_name in modules:
            layout = packed_attention.layout(modules[module_name], output_dim)
        else:
            continue
        found = surviving_indices(name[len(module_name) + 1:], old_shape, idxs, layout)
        if found is not None:
            kept[found[0]] = found[1]
    return kept
