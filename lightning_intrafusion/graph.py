"""The model's channel-dependency graph (Torch-Pruning), seen as plain tensors.

Turns each Torch-Pruning dependency group into a :class:`~lightning_intrafusion.group.PrunableGroup` of
:class:`~lightning_intrafusion.fusion.ChannelSlice` objects (which tensor holds which channel, producer or
consumer side), adds the groups of layers recognised by their attributes
(:mod:`~lightning_intrafusion.recognised_layers`: attention heads, packed MLPs), and decides which groups
may be pruned: outputs are protected, unsupported layers are refused with a clear error.
"""

from __future__ import annotations

import fnmatch
import math
import signal
import threading
from contextlib import contextmanager
from typing import Any, Collection, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import parametrize

from lightning_intrafusion.attention import LAYOUTS as ATTENTION_LAYOUTS
from lightning_intrafusion.attention import PrunableMultiheadAttention
from lightning_intrafusion.execution import eval_forward, preserved_modes
from lightning_intrafusion.fusion import BatchNormFold, ChannelSlice, GroupedInputSlice
from lightning_intrafusion.group import PrunableGroup, is_depthwise
from lightning_intrafusion.recognised_layers import RECOGNISED, attention_heads, attention_slices
from lightning_intrafusion.surgery import (
    HEAD_COUNTS, extra_pruners, is_grouped_conv, parameter_owner, shared_parameters, transposed_linear_types,
)

_OPTYPE = tp.ops.OPTYPE


class UnsupportedModelError(ValueError):
    """The model contains a layer or a connection that cannot be pruned exactly."""


def build_graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    """Trace ``model`` on ``example_inputs``; the model's train/eval mode is left as it was."""
    # the graph is read from autograd: frozen layers (requires_grad=False) would be invisible to it
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with preserved_modes(model), torch.enable_grad():  # tracing switches the model to eval mode
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, verbose=False, customized_pruners=extra_pruners() or None)
    except Exception as err:  # surface tracing failures as input errors
        raise ValueError(
            f"the dependency graph could not be traced on example_inputs ({type(err).__name__}: {err}); "
            "a common cause is an output that is not made of tensors, e.g. a Hugging Face cache "
            "(pass use_cache=False in the inputs)"
        ) from err
    finally:
        for p in frozen:
            p.requires_grad_(False)
    _repair_concat_offsets(graph)
    return graph


def _repair_concat_offsets(graph: tp.DependencyGraph) -> None:
    """Torch-Pruning leaves a channel concat without offsets when the concatenated tensor is later
    flattened (it compares the concat width with the flattened consumer's width). The concat sizes
    it inferred are right; apply them without that comparison, where the consumer's width is a multiple
    of theirs (flattened spatial positions). Any other width means the concat was not along the channels
    (a class token prepended to a ``(batch, tokens, width)`` sequence, as in CLIP): left alone."""
    from torch_pruning.dependency import index_mapping, shape_infer

    for node in graph.module2node.values():
        if node.type == _OPTYPE.CONCAT and not node.enable_index_mapping and node.module.offsets is not None:
            # Torch-Pruning turns the index mapping off for every concat downstream of a 3-D parameter (its
            # workaround for a ViT's class token, concatenated along the tokens), which also catches real channel
            # concats after it (DINOv2's classifier reads [class token, mean of patch tokens]): a concat whose
            # offsets it inferred, its consumer as wide as all inputs together, is along the channels
            node.enable_index_mapping = True
        if node.type != _OPTYPE.CONCAT or node.module.offsets is not None:
            continue
        sizes = node.module.concat_sizes
        if getattr(node.grad_fn, "_saved_dim", 1) != 1 or not sizes or any(c is None for c in sizes):
            continue
        consumer_width = shape_infer.infer_in_channels_recursively(graph, node, recursive_depth=[0])
        if consumer_width is not None and consumer_width % sum(sizes):
            if all(size == consumer_width for size in sizes):
                # along the tokens: every input carries the same channels, which Torch-Pruning's default
                # (identity) index mappings already follow; nothing to shift
                node.module.offsets = [0] * (len(sizes) + 1)
            continue
        original = shape_infer.infer_in_channels_recursively
        shape_infer.infer_in_channels_recursively = lambda *args, **kwargs: None
        try:
            index_mapping.update_concat_index_mapping(graph, node)
        finally:
            shape_infer.infer_in_channels_recursively = original


def iter_groups(graph: tp.DependencyGraph, unresolved: Optional[Dict[str, str]] = None) -> Iterator[PrunableGroup]:
    """Every dependency group of the (unpruned) model, rooted at a conv, linear or embedding layer,
    then the attention heads of every ``nn.MultiheadAttention``, packed-qkv (GPT-2), interleaved (GPT-NeoX),
    sectioned (ModernBERT) and grouped key/value (LLaMA family, Phi) attention layer the model ran, and the
    neurons of every gated MLP with packed gate and up projections (Phi-3, ModernBERT).

    Indices are only valid for the graph as traced: decide every group, then remove channels once
    (:mod:`lightning_intrafusion.surgery`), rather than pruning group by group. ``unresolved`` (root layer
    name -> reason) remembers the groups Torch-Pruning could not resolve, across graphs of the same model:
    a later call refuses them at once instead of waiting for them again.
    """
    names = {m: n for n, m in graph.model.named_modules()}
    # shared parameters by id -> the names they have in layers the forward reaches (an unused layer holding one,
    # such as a Hugging Face model's ``shared`` embedding, just takes the pruned tensor)
    traced = {names[m] for m in graph.module2node if isinstance(m, nn.Module) and m in names}
    tied = {key: [name for name in shared if name.rpartition(".")[0] in traced]
            for key, shared in shared_parameters(graph.model).items()}
    roots = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, nn.Embedding) + transposed_linear_types()
    # attention layers and packed MLPs recognised by their attributes: their channels come from the modules
    # below, not from Torch-Pruning's groups of their projections (which it cannot resolve)
    recognised = [(build, projections, name, module) for recognise, projections, build in RECOGNISED
                  for name, module in graph.model.named_modules()
                  if _traced(graph, getattr(module, projections[0], None)) and recognise(module)]
    own = {getattr(module, p) for _, projections, _, module in recognised for p in projections}
    groups: List[PrunableGroup] = []
    for root, tp_group in _tp_groups(graph, roots, names, skip=own, unresolved=unresolved):
        if isinstance(tp_group, str):
            name = names.get(root, type(root).__name__)
            groups.append(PrunableGroup(root_name=name, width=0, slices=[], folds=[], producers=[name], members=[name],
                                        root_module=root, unsupported=tp_group))
            continue
        groups.append(_describe(graph, tp_group, names))
    groups += [attention_heads(name, module) for name, module in graph.model.named_modules()
               if isinstance(module, nn.MultiheadAttention) and module in graph.module2node]
    groups += [build(name, module) for build, _, name, module in recognised]
    for group in _join_tied(groups, tied):
        yield _refuse_unprunable(group, tied)


def _seen_alike(uses: Sequence[ChannelSlice], names: Sequence[str]) -> bool:
    """Whether the slices ``uses`` of one shared parameter are every layer that shares it (``names``), each seeing
    the same channels of it along the same dimension."""
    return sorted(s.key for s in uses) == sorted(names) and all(
        s.dim == uses[0].dim and torch.equal(s.positions, uses[0].positions) for s in uses)


def _join_tied(groups: List[PrunableGroup], tied: Dict[int, List[str]]) -> List[PrunableGroup]:
    """Groups that one shared parameter couples, joined into one: BERT's masked-LM head reads the stream through a
    dense layer into an output layer that shares the word embedding, so the stream's channel ``c`` (the
    embedding's column ``c``) and the dense layer's output channel ``c`` (the output layer's column ``c``) must go
    together. Joined where every layer sharing the parameter is in one of the groups, all see the same channels of
    it along one dimension (groups never pruned aside), and the groups have the same width and unit; the joined
    group is scored from its tensors (it has no Torch-Pruning group)."""
    for key, names in tied.items():
        # groups never pruned (the output layer's own outputs, along the other dimension) do not count
        sharing = [g for g in groups if not g.protected and any(id(s.tensor) == key for s in g.slices)]
        if len(sharing) < 2 or len({(g.width, g.unit) for g in sharing}) != 1:
            continue
        if not _seen_alike([s for g in sharing for s in g.slices if id(s.tensor) == key], names):
            continue
        first = sharing[0]
        joined = PrunableGroup(
            root_name=first.root_name, width=first.width, slices=[s for g in sharing for s in g.slices],
            folds=[f for g in sharing for f in g.folds], producers=[p for g in sharing for p in g.producers],
            members=[m for g in sharing for m in g.members], blocks=math.lcm(*(g.blocks for g in sharing)),
            unit=first.unit, head_size=max(g.head_size for g in sharing),
            hidden_heads=any(g.hidden_heads for g in sharing), reordered=any(g.reordered for g in sharing),
            protected=next((g.protected for g in sharing if g.protected), None),
            unsupported=next((g.unsupported for g in sharing if g.unsupported), None),
            targets={k: v for g in sharing for k, v in g.targets.items()},
            layers=[layer for g in sharing for layer in g.layers], root_module=first.root_module,
            root_handler=first.root_handler)
        groups = [joined if g is first else g for g in groups if g is first or g not in sharing]
    return groups


def _traced(graph: tp.DependencyGraph, layer: Any) -> bool:
    return isinstance(layer, nn.Module) and layer in graph.module2node


GROUP_SECONDS = 5.0  # longest a single group may take to resolve; real groups take milliseconds


class _GroupTimeout(Exception):
    pass


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`_GroupTimeout` inside the block after ``seconds`` (main thread with SIGALRM only;
    elsewhere no limit). A previous alarm handler and timer are restored."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _GroupTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    remaining, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if remaining:
            signal.setitimer(signal.ITIMER_REAL, remaining)


def _tp_groups(graph: tp.DependencyGraph, roots: Tuple[type, ...], names: Dict[nn.Module, str],
               skip: Collection[nn.Module] = (), unresolved: Optional[Dict[str, str]] = None
               ) -> Iterator[Tuple[nn.Module, Any]]:
    """Torch-Pruning's groups, one per root layer not yet covered by an earlier group (as its
    ``get_all_groups``), each resolved under a time limit. A group Torch-Pruning cannot resolve (its search
    never ends on some graphs, or fails) comes as ``(root, reason)`` instead of hanging or crashing the
    caller, and so do, at once, the groups of layers of the same type at the same place in other repeated
    blocks (the same name up to block indices: ``layers.*.attn.q``), which would only spend the same time
    to fail the same way.
    Layers in ``skip`` are not made roots; ``unresolved`` (see :func:`iter_groups`) is read and extended."""
    unresolved = {} if unresolved is None else unresolved
    covered = set(skip)
    ignored = set(graph.IGNORED_LAYERS_IN_TRACING)
    timed_out: Dict[Tuple[type, str], str] = {}
    for module in list(graph.module2node):
        if module in ignored or not isinstance(module, roots) or module in covered:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        name = names.get(module, "")
        like = (type(module), _block_pattern(name))
        reason = unresolved.get(name) if name else None
        if reason is None and like[1] is not None and like in timed_out:
            reason = (f"Torch-Pruning could not resolve the dependencies of {timed_out[like]!r} within "
                      f"{GROUP_SECONDS:g} s, and this layer has the same place in another repeated block")
        if reason is None:
            try:
                with _time_limit(GROUP_SECONDS):
                    group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                                    list(range(pruner.get_out_channels(module))))
            except _GroupTimeout:
                timed_out[like] = name
                reason = (f"Torch-Pruning could not resolve its dependencies within {GROUP_SECONDS:g} s (a cycle of "
                          "slices and concatenations, e.g. rotary position embeddings)")
            except Exception as err:  # an index mapping Torch-Pruning cannot apply to this graph
                reason = (f"Torch-Pruning failed to resolve its dependencies ({type(err).__name__}: {err}), e.g. on a "
                          "reshape or repeat of its channels it cannot map")
        if reason is not None:
            covered.add(module)
            unresolved[name] = reason
            yield module, reason
            continue
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                covered.add(dep.target.module)
        yield module, group


def _block_pattern(name: str) -> Optional[str]:
    """A layer's place in a repeated block: its name with the block indices replaced by ``*``
    (``model.layers.3.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj``); ``None`` for a layer
    that is not inside an indexed block (``fc2``, or ``features.3`` of a plain Sequential)."""
    parts = name.split(".")
    inside_block = any(p.isdigit() and not q.isdigit() for p, q in zip(parts, parts[1:]))
    return ".".join("*" if p.isdigit() else p for p in parts) if inside_block else None


def _refuse_unprunable(group: PrunableGroup, tied: Dict[int, List[str]]) -> PrunableGroup:
    """``group``, marked unsupported if a tensor it would resize is shared other than as one tied tensor
    (see :func:`_refuse_tied`) or reparameterised."""
    return _refuse_reparameterised(_refuse_tied(group, tied))


def _refuse_reparameterised(group: PrunableGroup) -> PrunableGroup:
    """A group touching a weight that a parametrization computes (``torch.nn.utils.parametrize``, e.g.
    ``weight_norm``) or that a forward pre-hook recomputes (the older ``weight_norm`` from ``weight_g``/
    ``weight_v``, ``spectral_norm`` from ``weight_orig``) cannot be resized: the layer's pruning function cannot assign it, or the hook
    would overwrite the pruned values."""
    if group.unsupported is not None:
        return group
    for key, (module, attr) in group.targets.items():
        hooked = (all(isinstance(getattr(module, f"{attr}_{part}", None), nn.Parameter) for part in ("g", "v"))
                  or isinstance(getattr(module, f"{attr}_orig", None), nn.Parameter))  # weight_norm, spectral_norm
        computed = parametrize.is_parametrized(module, attr) or hooked
        if computed:
            group.unsupported = (f"{key} is computed from other parameters (weight_norm, spectral_norm or "
                                 "another parametrization), which pruning cannot resize; remove the parametrization "
                                 "first (torch.nn.utils.parametrize.remove_parametrizations) to prune it")
            break
    return group


def _refuse_tied(group: PrunableGroup, tied: Dict[int, List[str]]) -> PrunableGroup:
    """A group whose channels live in a shared parameter (tied input and output embeddings; ``tied``: id ->
    the names it has in layers the forward reaches) is pruned only if every such layer is in the group and
    sees the same channels of it along the same dimension: the columns then go once for all of them, and the
    slices of that tensor are listed in ``group.tied`` (its columns are removed without merging: one tensor
    cannot be averaged as an embedding and summed as an output layer; the group's other tensors are fused).
    Otherwise pruning it in some layers only would untie them: refused."""
    for key in {id(s.tensor) for s in group.slices} & set(tied):
        uses = [s for s in group.slices if id(s.tensor) == key]
        if _seen_alike(uses, tied[key]):
            group.tied += tuple(s.key for s in uses)
        elif group.unsupported is None:
            group.unsupported = (f"its channels live in {' = '.join(tied[key])}, one shared (tied) parameter, e.g. "
                                 "tied input and output embeddings, which layers outside this group also use (or use "
                                 "along another dimension); pruning it would untie them")
    return group


def _describe(graph: tp.DependencyGraph, tp_group: Any, names: Dict[nn.Module, str]) -> PrunableGroup:
    root_dep = tp_group[0].dep
    root = root_dep.target.module
    width = len(tp_group[0].idxs)
    slices: List[ChannelSlice] = []
    producers: List[str] = []
    members: List[str] = []
    protected: Optional[str] = None
    unsupported: Optional[str] = None
    blocks = 1
    bn_items: List[Tuple[Any, Dict[str, ChannelSlice]]] = []
    producer_weights: Dict[Any, Tuple[ChannelSlice, Optional[ChannelSlice]]] = {}
    targets: Dict[str, Tuple[nn.Module, str]] = {}
    layers: List[Tuple[Any, str, torch.Tensor]] = []

    head_dim, hidden_heads, reshaped, transposed = 0, False, False, False
    for item in tp_group:
        dep = item.dep
        node = dep.target
        module = node.module
        is_out = graph.is_out_channel_pruning_fn(dep.handler)
        head_dim = head_dim or _attention_head_dim(node)
        hidden_heads = hidden_heads or _activation_matmul(node)
        reshaped = reshaped or node.type == _OPTYPE.RESHAPE
        transposed = transposed or _grad_fn_name(node) in ("TransposeBackward0", "PermuteBackward0")
        if is_out and not node.outputs:
            protected = f"its channels are model outputs (produced by {names.get(module, node.name)})"
        if node.type in (_OPTYPE.CONCAT, _OPTYPE.SPLIT) and getattr(module, "offsets", None) is None:
            unsupported = (f"a torch.{'cat' if node.type == _OPTYPE.CONCAT else 'split'} whose channel offsets "
                           "could not be inferred (not along dim 1?)")
            continue
        if node.type == _OPTYPE.PARAMETER:
            # a bare nn.Parameter used in forward (e.g. a positional embedding added to the stream)
            name = graph._param_to_name.get(module)
            dims = [u.pruning_dim for u in graph.unwrapped_parameters if u.parameters is module]
            positions = _positions(item.idxs, item.root_idxs, width)
            if name is None or not dims or positions is None:
                unsupported = f"unwrapped nn.Parameter {name or '?'}"
                continue
            owner, attr = parameter_owner(graph.model, name)
            slices.append(ChannelSlice(name, module, dims[0], positions, "producer", False))
            targets[name] = (owner, attr)
            layers.append((name, f"dim{dims[0]}", positions))
            members.append(name)
            continue
        if not isinstance(module, nn.Module) or not any(True for _ in module.parameters(recurse=False)) and not _has_stats(module):
            continue
        name = names.get(module, type(module).__name__)
        members.append(name)
        positions = _positions(item.idxs, item.root_idxs, width)
        if positions is None:
            unsupported = f"{name} ({type(module).__name__}) sees the group's channels unevenly (split/slice)"
            continue
        if isinstance(module, nn.MultiheadAttention):
            if not (isinstance(module, PrunableMultiheadAttention) or module._qkv_same_embed_dim):
                unsupported = f"{name} is an nn.MultiheadAttention with kdim/vdim != embed_dim"
                continue
            layers.append((module, "embed", positions))
            for key, target, made_slice in attention_slices(name, module, ATTENTION_LAYOUTS["embed"], lambda copies: positions):
                if key not in targets:
                    slices.append(made_slice)
                    targets[key] = target
            continue
        spec = _tensor_specs(module, is_out)
        if spec is None:
            unsupported = _why_unsupported(name, module)
            continue
        grouped = is_grouped_conv(module)
        if grouped and not torch.equal(positions.flatten(), torch.arange(positions.numel())):
            unsupported = f"{name} is a grouped convolution that sees the group's channels reordered or in part"
            continue
        layers.append((module, "out" if is_out else "in", positions))
        if isinstance(module, nn.GroupNorm) or grouped:
            # merge and remove channels only within a norm group / conv group, equally many in each
            blocks = math.lcm(blocks, module.num_groups if isinstance(module, nn.GroupNorm) else module.groups)
        made: Dict[str, ChannelSlice] = {}
        for attr, dim, role, feature in spec:
            tensor = getattr(module, attr, None)
            if tensor is None:
                continue
            key = f"{name}.{attr}" if name else attr
            if grouped and role == "consumer":
                made[attr] = GroupedInputSlice(key, tensor, dim, positions, role, feature, groups=module.groups)
            else:
                made[attr] = ChannelSlice(key, tensor, dim, positions, role, feature)
            targets[key] = (module, attr)
            slices.append(made[attr])
        if spec and spec[0][2] == "producer" and isinstance(
                module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d) + transposed_linear_types()):
            producers.append(name)
            if "weight" in made and not is_depthwise(module):
                producer_weights[node] = (made["weight"], made.get("bias"))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            bn_items.append((node, made))

    beyond = next((s.key for s in slices if not isinstance(s, GroupedInputSlice) and s.positions.numel()
                   and int(s.positions.max()) >= s.tensor.shape[s.dim]), None)
    if beyond is not None and unsupported is None:
        unsupported = (f"the graph maps its channels beyond the size of {beyond} (a split or reshape it could not "
                       "follow, e.g. query/key/value packed in one layer)")
    folds = _batchnorm_folds(bn_items, producer_weights)
    unit = 1
    through_attention_layer = any(isinstance(m, nn.MultiheadAttention) for m, _, _ in layers)
    if head_dim and width % head_dim == 0 and not through_attention_layer:
        unit = head_dim  # query/key/value channels of attention heads: kept, removed and merged whole heads
    hidden_heads = hidden_heads and unit == 1 and not through_attention_layer
    if hidden_heads and unsupported is None:
        unit = declared_head_size(graph.model, producers, width)  # the attention layer says how wide its heads are
        hidden_heads = unit == 1
    reordered = reshaped and transposed and not head_dim and not through_attention_layer and not hidden_heads
    if width % blocks and unsupported is None:
        unsupported = f"its {width} channels cannot be split into {blocks} equal conv/norm groups"
    return PrunableGroup(
        root_name=names.get(root, "?"), width=width, slices=slices, folds=folds, producers=producers,
        members=members, blocks=blocks, unit=unit, hidden_heads=hidden_heads, reordered=reordered, protected=protected,
        unsupported=unsupported, targets=targets, layers=layers, tp_group=tp_group, root_module=root,
        root_handler=root_dep.handler,
    )


def _grad_fn_name(node: Any) -> str:
    """Name of the autograd function a traced node stands for ("" for none)."""
    grad_fn = getattr(node, "grad_fn", None)
    return grad_fn.name() if grad_fn is not None and hasattr(grad_fn, "name") else ""


def channel_mapping_holds(model: nn.Module, example_inputs: Any, group: PrunableGroup) -> bool:
    """Probe the graph's channel mapping: perturb a few output channels of the group's root layer and
    check that the input channel of the first consuming layer that changes most is the one the graph
    maps them to. Nothing is modified. Inconclusive probes (no consumer, nothing changed) pass."""
    producer = next((s for s in group.slices if s.role == "producer" and s.is_feature
                     and group.targets[s.key][0] is group.root_module), None)
    consumer = next((s for s in group.slices if s.role == "consumer" and s.is_feature), None)
    if producer is None or consumer is None or group.width < 3:
        return True
    consumer_module = group.targets[consumer.key][0]
    if isinstance(consumer_module, nn.MultiheadAttention):
        return True
    seen: Dict[str, torch.Tensor] = {}

    def channel_dim(module: nn.Module) -> int:
        return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1

    def run(channel: Optional[int]) -> torch.Tensor:
        def perturb(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            if channel is None:
                return output
            out = output.clone()
            out.select(channel_dim(module), channel).add_(10.0 * (1.0 + float(output.detach().abs().max())))
            return out

        def capture(module: nn.Module, args: Any) -> None:
            seen["input"] = args[0].detach()

        eval_forward(model, example_inputs, [group.root_module.register_forward_hook(perturb),
                                             consumer_module.register_forward_pre_hook(capture)])
        return seen["input"]

    base = run(None)
    dim = channel_dim(consumer_module) % base.dim()
    for j in (1, group.width - 2):
        change = (run(int(producer.positions[j, 0])) - base).abs().float().movedim(dim, 0).flatten(1).sum(1)
        if float(change.max()) <= 0:
            continue
        if int(change.argmax()) not in set(consumer.positions[j].tolist()):
            return False
    return True


def _attention_head_dim(node: Any) -> int:
    """The head size of a ``scaled_dot_product_attention`` call that the group's channels flow into
    (its saved query is ``(..., heads, tokens, head_dim)``), or 0."""
    query = getattr(node.grad_fn, "_saved_query", None) if "ScaledDotProduct" in _grad_fn_name(node) else None
    return int(query.shape[-1]) if isinstance(query, torch.Tensor) and query.dim() >= 3 else 0


HEAD_SIZES = ("attention_head_size", "head_dim", "head_size", "d_head")  # attributes giving one head's channels


def declared_head_size(model: nn.Module, producers: Sequence[str], width: int) -> int:
    """For channels that meet in a matrix product of activations (attention written out with ``@``): the head
    size that the common parent of the layers producing them declares (:data:`HEAD_SIZES`), if it also holds a
    head count (:data:`~lightning_intrafusion.surgery.HEAD_COUNTS`) and the two multiply to ``width`` (BERT-style
    ``attention_head_size`` x ``num_attention_heads``); else 1."""
    parents = {name.rpartition(".")[0] for name in producers}
    if len(parents) != 1:
        return 1
    parent = parents.pop()
    module = model.get_submodule(parent) if parent else model
    ints = {attr: getattr(module, attr, None) for attr in HEAD_SIZES + HEAD_COUNTS}
    ints = {attr: value for attr, value in ints.items() if isinstance(value, int) and not isinstance(value, bool) and value > 0}
    sizes = {ints[a] for a in HEAD_SIZES if a in ints}
    counts = {ints[a] for a in HEAD_COUNTS if a in ints}
    matching = {size for size in sizes for count in counts if size * count == width}
    return matching.pop() if len(matching) == 1 and 1 not in matching else 1


def _activation_matmul(node: Any) -> bool:
    """A batched matrix product of two activations (attention scores or weighted values written out
    with ``@``), as opposed to a layer applying its weights."""
    if node.type != _OPTYPE.ELEMENTWISE or not _grad_fn_name(node).startswith("BmmBackward"):
        return False
    return all(f is not None and "AccumulateGrad" not in f.name() for f, _ in node.grad_fn.next_functions)


def _has_stats(module: nn.Module) -> bool:
    norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    return isinstance(module, norms) and getattr(module, "running_mean", None) is not None


def _tensor_specs(module: nn.Module, is_out: bool) -> Optional[List[Tuple[str, int, str, bool]]]:
    """(attribute, channel dim, role, is_feature) for each tensor of ``module`` in the group."""
    if isinstance(module, nn.modules.conv._ConvNd):
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        if is_depthwise(module) and not transposed:
            return [("weight", 0, "producer", True), ("bias", 0, "producer", False)]
        if module.groups != 1 and transposed:
            return None
        if is_out:
            return [("weight", 1 if transposed else 0, "producer", True), ("bias", 0, "producer", False)]
        return [("weight", 0 if transposed else 1, "consumer", True)]
    if isinstance(module, nn.Linear):
        if is_out:
            return [("weight", 0, "producer", True), ("bias", 0, "producer", False)]
        return [("weight", 1, "consumer", True)]
    if isinstance(module, transposed_linear_types()):  # weight (in, out): y = x @ W + b
        if is_out:
            return [("weight", 1, "producer", True), ("bias", 0, "producer", False)]
        return [("weight", 0, "consumer", True)]
    if isinstance(module, nn.Embedding):
        return [("weight", 1, "producer", True)] if is_out else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return [(a, 0, "producer", False) for a in ("weight", "bias", "running_mean", "running_var")]
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            return None
        return [("weight", 0, "producer", False), ("bias", 0, "producer", False)]
    if isinstance(module, nn.GroupNorm):
        return [("weight", 0, "producer", False), ("bias", 0, "producer", False)]
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):  # per-channel affine, like GroupNorm
        return None if module.track_running_stats else [("weight", 0, "producer", False), ("bias", 0, "producer", False)]
    if isinstance(module, nn.PReLU):
        return [("weight", 0, "producer", False)] if module.num_parameters > 1 else []
    return None


def _why_unsupported(name: str, module: nn.Module) -> str:
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1:
        return f"{name} is a grouped transposed convolution (groups={module.groups}), which has no fusion rule"
    if isinstance(module, nn.LayerNorm):
        return f"{name} is a LayerNorm over {tuple(module.normalized_shape)} (only 1-D is supported)"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return f"{name} is an instance norm with running statistics (track_running_stats=True), which has no fusion rule"
    return f"{name} ({type(module).__name__}) is a layer type without a fusion rule"


def _positions(idxs: Sequence[int], root_idxs: Sequence[int], width: int) -> Optional[torch.Tensor]:
    """``(width, c)`` positions: row r lists the indices that root channel r occupies in this item."""
    buckets: List[List[int]] = [[] for _ in range(width)]
    for idx, root in zip(idxs, root_idxs):
        if root is None or not 0 <= int(root) < width:
            return None
        buckets[int(root)].append(int(idx))
    counts = {len(b) for b in buckets}
    if len(counts) != 1 or 0 in counts:
        return None
    return torch.tensor([sorted(b) for b in buckets], dtype=torch.long)


def _batchnorm_folds(bn_items: list, producer_weights: dict) -> List[BatchNormFold]:
    folds = []
    for node, made in bn_items:
        if not {"weight", "bias", "running_mean", "running_var"} <= made.keys():
            continue
        sources = [n for n in node.inputs if n in producer_weights]
        if len(node.inputs) != 1 or len(sources) != 1 or len(sources[0].outputs) != 1:
            continue
        weight, bias = producer_weights[sources[0]]
        if weight.positions.shape[1] != 1 or made["weight"].positions.shape[1] != 1:
            continue
        folds.append(BatchNormFold(weight, bias, made["weight"], made["bias"], made["running_mean"],
                                   made["running_var"], float(node.module.eps)))
    return folds


def following_batchnorm(graph: tp.DependencyGraph, module: nn.Module) -> Optional[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm (with running statistics) that alone consumes ``module``'s output, if any."""
    node = graph.module2node.get(module)
    if node is None or len(node.outputs) != 1:
        return None
    follower = node.outputs[0].module
    if isinstance(follower, nn.modules.batchnorm._BatchNorm) and follower.running_var is not None:
        return follower
    return None


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
