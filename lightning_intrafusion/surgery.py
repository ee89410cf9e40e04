"""Physical removal of channels, and its replayable record.

All indices of one pruning step are decided on the unpruned graph and applied here in one pass,
once per (layer, side), so that no stale index mapping of the dependency graph (concat offsets
after an earlier removal) can misplace them. The record is a list of plain
``[module_name, side, indices]`` entries: JSON-able, and replaying it on a fresh model of the same
class rebuilds the pruned shapes (so ``load_state_dict`` works on pruned checkpoints).
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch_pruning as tp
from torch import nn

from lightning_intrafusion import packed_attention
from lightning_intrafusion.attention import LAYOUTS as ATTENTION_LAYOUTS
from lightning_intrafusion.attention import SIDES as ATTENTION_SIDES
from lightning_intrafusion.attention import PrunableMultiheadAttention, parameter_slot, surviving_indices
from lightning_intrafusion.execution import eager

# (module name, "out" | "in", indices), (parameter name, "dim<d>", indices), (attention layer name,
# "heads" | "embed", projection or embedding channels), or (module name, "count:<attribute>", removed
# heads or channels): an int attribute of the module that counts them shrinks by their number
# ("count:config.<attribute>": one of the config it holds, which the module first gets a copy of)
Removal = Tuple[str, str, List[int]]
COUNT = "count:"
HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads")  # attributes that count heads
HEAD_WIDTHS = ("all_head_size",)  # attributes that count projection channels (heads x head size)
# what further attributes count, where a recognised layer names them (``counts`` of head_count_removals)
COUNTED_BY = {"num_attention_heads": "head", "num_key_value_heads": "unit", "num_key_value_groups": "head",
              "embed_dim": "channel", "split_size": "channel"}


class TransposedLinearPruner(tp.pruner.function.BasePruningFunc):
    """Removal for linear layers that store their weight as ``(in, out)`` and compute ``x @ W + b``
    (Hugging Face's ``Conv1D`` in GPT-2 style models), unknown to Torch-Pruning."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = complement(layer.weight.shape[1], idxs)
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = complement(layer.weight.shape[0], idxs)
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        if hasattr(layer, "nx"):
            layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]


def transposed_linear_types() -> Tuple[type, ...]:
    """Layer classes handled by :class:`TransposedLinearPruner` that this process has imported
    (transformers is never imported here: a model made of its layers has imported it already)."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return (conv1d,) if isinstance(conv1d, type) else ()


def extra_pruners() -> Dict[type, tp.pruner.function.BasePruningFunc]:
    """Pruning functions for layer types Torch-Pruning does not know, for its dependency graph."""
    return {kind: TransposedLinearPruner() for kind in transposed_linear_types()}


def output_dim(module: nn.Module) -> int:
    """The dimension of ``module.weight`` that indexes its output channels."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd) or isinstance(module, transposed_linear_types()):
        return 1
    return 0


_PRUNERS = tp.DependencyGraph()  # only used as a registry of per-layer pruning functions


def pruning_function(module: nn.Module, side: str):
    for kind, extra in extra_pruners().items():
        if kind not in _PRUNERS.CUSTOMIZED_PRUNERS:
            _PRUNERS.register_customized_layer(kind, extra)
    pruner = _PRUNERS.get_pruner_of_module(module)
    if pruner is None:
        raise ValueError(f"no pruning function for {type(module).__name__}")
    return pruner.prune_out_channels if side == "out" else pruner.prune_in_channels


def merge_removals(entries: Sequence[Tuple[Any, str, Sequence[int]]], names: Dict[nn.Module, str]) -> List[Removal]:
    """Union of the indices removed from each (layer, pruning function); sides that share one
    function (norm layers, depthwise convs) are merged so that nothing is removed twice. Bare
    parameters come as (parameter name, "dim<d>", indices)."""
    merged: Dict[Tuple[Any, object], Tuple[Any, str, set]] = {}
    for target, side, idxs in entries:
        if isinstance(target, str) or side in ATTENTION_SIDES or side == packed_attention.SIDE:
            key: Tuple[Any, object] = (target, side)
        else:
            fn = pruning_function(target, side)
            key = (id(target), getattr(fn, "__func__", fn))
        if key not in merged:
            merged[key] = (target, side, set())
        merged[key][2].update(int(i) for i in idxs)
    return [(t if isinstance(t, str) else names[t], side, sorted(idxs)) for t, side, idxs in merged.values() if idxs]


def apply_removals(model: nn.Module, removals: Sequence[Removal]) -> None:
    """Remove the listed channels (indices refer to the widths before this call). Parameters keep
    their ``requires_grad`` (frozen layers stay frozen), and parameters that several layers shared (tied
    embeddings) are shared again: each layer's removal made its own copy, which must agree."""
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    shared = shared_parameters(model)
    try:
        _apply_removals(model, removals)
        _tie_again(model, shared)
    finally:
        for name, p in model.named_parameters():
            if name in trainable and p.requires_grad != trainable[name]:
                p.requires_grad_(trainable[name])


def shared_parameters(model: nn.Module) -> Dict[int, List[str]]:
    """Parameters that several layers share (e.g. tied input and output embeddings): id -> names."""
    owners: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    return {key: names for key, names in owners.items() if len(names) > 1}


def _tie_again(model: nn.Module, shared: Dict[int, List[str]]) -> None:
    """Every layer of a formerly shared parameter (``shared``: its id before the removals -> names) gets the
    one pruned copy; the removals of the layers that had it pruned must agree (layers the forward never
    reached, such as a Hugging Face model's unused ``shared`` embedding, simply take it)."""
    for original, names in shared.items():
        slots = [parameter_owner(model, name) for name in names]
        pruned = [getattr(owner, attr) for owner, attr in slots]
        pruned = [p for p in pruned if id(p) != original]
        if not pruned:
            continue
        if any(p.shape != pruned[0].shape or not torch.equal(p.data, pruned[0].data) for p in pruned):
            raise ValueError(f"pruning left the shared parameter {' = '.join(names)} different in its layers "
                             f"({', '.join(str(tuple(p.shape)) for p in pruned)})")
        for owner, attr in slots:
            setattr(owner, attr, pruned[0])


def head_count_removals(model: nn.Module, projections: Sequence[str], width: int, head_size: int, unit: int,
                        removed: Sequence[int], counts: Sequence[str] = ()) -> List[Removal]:
    """Records that keep an attention layer's own head counts (and projection width) in step when the
    projection channels ``removed`` go, in whole units of ``unit`` channels (one key/value head's query
    heads, with grouped key/value heads; else one head of ``head_size``). The layer is the common parent of
    the ``projections`` (query/key/value layers); only int attributes named like a head count that hold the
    current count are concerned: :data:`HEAD_COUNTS` (query heads), ``num_key_value_heads`` (units) and
    :data:`HEAD_WIDTHS` (channels), and ``counts``, further attributes that the layer's forward is known to
    read (:data:`COUNTED_BY`; ``config.<name>``: one of the layer's config, as Phi-3 reads its head count). A
    forward that reshapes with such an attribute (``view(batch, -1, self.num_heads, head_size)``) would
    otherwise regroup tokens silently."""
    parents = {name.rpartition(".")[0] for name in projections}
    if len(parents) != 1:
        return []
    parent = parents.pop()
    module = model.get_submodule(parent) if parent else model
    sizes = {**{attr: head_size for attr in HEAD_COUNTS}, "num_key_value_heads": unit, **{attr: 1 for attr in HEAD_WIDTHS}}
    counted = [(attr, getattr(module, attr, None), size) for attr, size in sizes.items()]
    for path in counts:
        holder, _, attr = path.rpartition(".")
        per = {"head": head_size, "unit": unit, "channel": 1}[COUNTED_BY[attr]]
        counted.append((path, getattr(getattr(module, holder, None) if holder else module, attr, None), per))
    out: List[Removal] = []
    for attr, value, size in counted:
        if isinstance(value, int) and not isinstance(value, bool) and value == width // size:
            out.append((parent, COUNT + attr, sorted({int(c) // size for c in removed})))
    return out


def _apply_removals(model: nn.Module, removals: Sequence[Removal]) -> None:
    modules = dict(model.named_modules())
    for name, side, idxs in removals:
        if side.startswith(COUNT):
            if name not in modules:
                raise ValueError(f"pruning history names a module {name!r} that the model does not have")
            owner, (holder, _, attr) = modules[name], side[len(COUNT):].rpartition(".")
            if holder:  # the layer's config, which every layer may share: the layer gets a copy of its own
                setattr(owner, holder, copy.copy(getattr(owner, holder)))
                owner = getattr(owner, holder)
            setattr(owner, attr, getattr(owner, attr) - len(idxs))
            continue
        if side.startswith("dim"):
            _prune_parameter(model, name, int(side[3:]), idxs)
            continue
        if side in ATTENTION_SIDES:
            remove_attention_channels(model, name, side, idxs)
            continue
        if side == packed_attention.SIDE:
            remove_packed_heads(model, name, idxs)
            continue
        if name not in modules:
            raise ValueError(f"pruning history names a module {name!r} that the model does not have")
        module = modules[name]
        if side == "in" and is_grouped_conv(module):
            _prune_grouped_conv_inputs(module, idxs)
            continue
        pruning_function(module, side)(module, list(idxs))


def remove_attention_channels(model: nn.Module, name: str, side: str, idxs: Sequence[int]) -> None:
    """Remove projection channels (``side="heads"``: whole heads) or embedding channels
    (``side="embed"``) ``idxs`` from attention layer ``name``, converting a ``nn.MultiheadAttention``
    to :class:`~lightning_intrafusion.attention.PrunableMultiheadAttention` first."""
    module = model.get_submodule(name)
    if not isinstance(module, nn.MultiheadAttention):
        raise ValueError(f"pruning history names {name!r} as an attention layer, but it is a {type(module).__name__}")
    if not isinstance(module, PrunableMultiheadAttention):
        module = PrunableMultiheadAttention.from_torch(module)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module)
    width = module.inner_dim if side == "heads" else module.embed_dim
    if len(set(idxs)) >= width or (side == "heads" and len(idxs) % module.head_dim):
        raise ValueError(f"cannot remove {len(idxs)} {side} channels from {name!r} (width {width}, head_dim {module.head_dim})")
    for attr in ATTENTION_LAYOUTS[side]:
        owner, leaf = parameter_slot(module, attr)
        param = getattr(owner, leaf)
        if param is None:
            continue
        dim, keep = surviving_indices(attr, param.shape, idxs, ATTENTION_LAYOUTS[side])
        # a new Parameter, not new .data: autograd remembers the shape of the old one
        setattr(owner, leaf, nn.Parameter(param.data.index_select(dim, keep.to(param.device)),
                                          requires_grad=param.requires_grad))
    if side == "embed":  # packed projections only: keys and values have the embedding's width
        module.embed_dim = module.kdim = module.vdim = module.in_proj_weight.shape[1]
    module.out_proj.in_features, module.out_proj.out_features = module.inner_dim, module.embed_dim


def remove_packed_heads(model: nn.Module, name: str, idxs: Sequence[int]) -> None:
    """Remove projection channels ``idxs`` (whole heads) from the packed-qkv attention layer ``name``:
    the three sections of ``c_attn``'s outputs, ``c_proj``'s inputs, and the layer's head count."""
    module = model.get_submodule(name)
    if not packed_attention.is_packed_attention(module):
        raise ValueError(f"pruning history names {name!r} as a packed-qkv attention layer, but it is a "
                         f"{type(module).__name__}")
    width, head_dim, removed = module.split_size, module.head_dim, sorted(set(int(i) for i in idxs))
    if len(removed) >= width or len(removed) % head_dim:
        raise ValueError(f"cannot remove {len(idxs)} channels from {name!r} (width {width}, head_dim {head_dim})")
    pruning_function(module.c_attn, "out")(module.c_attn, [i + s * width for s in range(3) for i in removed])
    pruning_function(module.c_proj, "in")(module.c_proj, removed)
    module.split_size = width - len(removed)
    module.num_heads = module.split_size // head_dim


def is_grouped_conv(module: nn.Module) -> bool:
    """A convolution with ``1 < groups`` that is not depthwise (each group sees several channels)."""
    return (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups > 1
            and not module.groups == module.in_channels == module.out_channels)


def select_grouped_inputs(weight: torch.Tensor, groups: int, removed: Sequence[int]) -> torch.Tensor:
    """The weight ``(out, in / groups, *k)`` of a grouped conv without input channels ``removed``:
    every conv group keeps its own columns, so each must lose equally many channels."""
    per_group = weight.shape[1]
    drop: List[List[int]] = [[] for _ in range(groups)]
    for idx in removed:
        drop[int(idx) // per_group].append(int(idx) % per_group)
    if len({len(d) for d in drop}) != 1:
        raise ValueError(f"a grouped convolution must lose equally many input channels in each of its {groups} groups")
    rows = weight.shape[0] // groups
    parts = [weight[b * rows:(b + 1) * rows].index_select(
        1, torch.tensor(complement(per_group, drop[b]), dtype=torch.long, device=weight.device)) for b in range(groups)]
    return torch.cat(parts, 0)


def _prune_grouped_conv_inputs(conv: nn.Module, idxs: Sequence[int]) -> None:
    weight = conv.weight
    conv.weight = nn.Parameter(select_grouped_inputs(weight.data, conv.groups, idxs), requires_grad=weight.requires_grad)
    if weight.grad is not None:
        conv.weight.grad = select_grouped_inputs(weight.grad, conv.groups, idxs)
    conv.in_channels -= len(idxs)


def complement(size: int, idxs: Sequence[int]) -> List[int]:
    """The indices of ``range(size)`` not in ``idxs``, in order (the kept ones of a removal, or the
    removed ones of a selection)."""
    taken = set(int(i) for i in idxs)
    return [i for i in range(size) if i not in taken]


def parameter_owner(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    """The module holding parameter ``name`` (dotted, as in ``named_parameters``) and its attribute."""
    owner_name, _, attr = name.rpartition(".")
    return (model.get_submodule(owner_name) if owner_name else model), attr


def _prune_parameter(model: nn.Module, name: str, dim: int, idxs: Sequence[int]) -> None:
    owner, attr = parameter_owner(model, name)
    param = getattr(owner, attr, None)
    if not isinstance(param, nn.Parameter):
        raise ValueError(f"pruning history names a parameter {name!r} that the model does not have")
    keep = torch.tensor(complement(param.shape[dim], idxs), dtype=torch.long, device=param.device)
    setattr(owner, attr, nn.Parameter(param.data.index_select(dim, keep), requires_grad=param.requires_grad))


def replay_history(model: nn.Module, history: Sequence[Sequence[Removal]]) -> None:
    """Re-apply a sequence of pruning steps (each a list of removals) to a fresh, unpruned model
    (names are those of the uncompiled model, as :func:`~lightning_intrafusion.prune` records them)."""
    with eager(model) as plain:
        for step in history:
            apply_removals(plain, [(str(n), str(s), [int(i) for i in idxs]) for n, s, idxs in step])
