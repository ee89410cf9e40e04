"""One structured pruning step: choose the kept channels of every group, merge the others into them
(Intra-Fusion) or drop them (default), and commit the new shapes atomically.

Knows Torch-Pruning (through :mod:`lightning_intrafusion.graph`); knows nothing of Lightning.
"""

from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_intrafusion import ot as ot_math
from lightning_intrafusion.calibration import recalibrate_batchnorm, tracking_batchnorms
from lightning_intrafusion.compensation import consumer_input_means, lost_mean_shifts
from lightning_intrafusion.cost import count_macs_and_params
from lightning_intrafusion.execution import eager, eval_forward
from lightning_intrafusion.fusion import (
    channel_correlation,
    channel_features,
    channel_gram,
    channel_square_norms,
    fuse_group,
    merge_matrices,
    output_variance_ratios,
)
from lightning_intrafusion.graph import (
    PrunableGroup,
    UnsupportedModelError,
    build_graph,
    channel_mapping_holds,
    following_batchnorm,
    iter_groups,
    matches,
)
from lightning_intrafusion.importance import ImportanceLike, needs_gradients, resolve_importance, score_group
from lightning_intrafusion.ot import OTConfig
from lightning_intrafusion.report import UNSUPPORTED, GroupReport, PruneReport
from lightning_intrafusion.snapshot import ModelSnapshot
from lightning_intrafusion.surgery import Removal, apply_removals, complement, head_count_removals, merge_removals
from lightning_intrafusion.synthetic import synthesize_inputs

METHODS = ("intrafusion", "default")


def prune(
    model: nn.Module,
    example_inputs: Any,
    sparsity: float,
    method: str = "intrafusion",
    importance: ImportanceLike = "l1",
    ot_config: Optional[OTConfig] = None,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    calibration_data: Union[None, str, Iterable[Any]] = None,
    calibration_batches: Optional[int] = None,
    compensate_means: bool = True,
    reference_widths: Optional[Mapping[str, int]] = None,
    channel_blocks: Optional[Mapping[str, int]] = None,
    gradient_fn: Optional[Callable[[nn.Module], Tensor]] = None,
    on_unsupported: str = "raise",
    verbose: bool = False,
) -> PruneReport:
    """Structurally prune ``model`` in place and return a :class:`PruneReport`.

    Args:
        model: any ``nn.Module``; channels are physically removed.
        example_inputs: what ``model(...)`` accepts: a tensor, a tuple (positional) or a dict (keyword).
        sparsity: fraction of the channels of every pruned group to remove, ``0 <= sparsity < 1``.
            With ``reference_widths`` it is relative to those widths (cumulative pruning).
        method: ``"intrafusion"`` merges all channels into the kept ones along an OT plan,
            ``"default"`` drops the very same channels (the baseline).
        importance: ``"l1"``, ``"l2"``, ``"taylor"`` (needs ``gradient_fn``), ``"lamp"``, ``"random"``,
            ``"fpgm"``, ``"bn_scale"``, or a Torch-Pruning-style ``importance(group)`` object.
        ot_config: :class:`OTConfig`; ``OTConfig.paper()`` reproduces the released configuration.
        include / exclude: module-name globs; a group is pruned if one of the layers producing its
            channels matches ``include`` (default: all) and none of its layers matches ``exclude``.
            Groups whose channels are model outputs are never pruned.
        calibration_data: optional iterable of input batches (read once if it is a one-shot iterator); the
            means of removed channels are compensated (``compensate_means``) and BatchNorm statistics are
            re-estimated on them after pruning (``calibration_batches`` caps how many are used). ``"synthetic"``: without
            any data, on inputs distilled from the unpruned model's own BN statistics
            (:func:`~lightning_intrafusion.synthetic.synthesize_inputs` with its defaults; call it yourself
            to choose their number and the optimisation steps). With it, on a model with BatchNorm, the default
            ``OTConfig(solver="auto")`` takes Sinkhorn plans (better once statistics are re-estimated).
        compensate_means: with ``calibration_data``, first measure the mean input of every layer with a
            bias on it (the model as it is), then move the mean contribution of each channel that is
            removed without being merged (entirely under ``"default"``) into its consumers' biases
            (:mod:`~lightning_intrafusion.compensation`): where no BatchNorm follows (transformer blocks,
            classifiers, MLPs), re-estimating statistics cannot recentre the outputs, this does. Groups
            without BatchNorm then merge only closer channels (``OTConfig.max_cost_without_bn_compensated``).
        reference_widths: ``{group name: width}`` the sparsity refers to (e.g. the original widths,
            from an earlier report's ``groups``); defaults to the current widths.
        channel_blocks: ``{glob: size}`` for layers whose output channels come in indivisible blocks
            (e.g. ``{"*.attn.q": head_dim, "*.attn.k": head_dim, "*.attn.v": head_dim}``): whole blocks
            are kept, removed and merged.
        gradient_fn: ``fn(model) -> loss``; called once and back-propagated for gradient importances.
        on_unsupported: what to do with a group that cannot be pruned exactly (a channel shuffle, packed
            qkv heads, tied parameters, ...): ``"raise"`` (default) refuses the whole step with an
            :class:`UnsupportedModelError` naming it; ``"skip"`` leaves such groups unpruned, prunes the
            others, lists them in ``report.skipped`` (reason prefixed ``"unsupported: "``) and warns once.
        verbose: print progress (graph, each group as it is fused, the result) to stdout.

    The step is all or nothing: on any error the model is restored exactly and the error re-raised.
    """
    _check_arguments(model, sparsity, method, ot_config, include, exclude)
    if isinstance(calibration_data, str) and calibration_data != "synthetic":
        raise ValueError(f"calibration_data must be an iterable of input batches or 'synthetic', got {calibration_data!r}")
    if on_unsupported not in ("raise", "skip"):
        raise ValueError(f"on_unsupported must be 'raise' or 'skip', got {on_unsupported!r}")
    # the step's settings: solver="auto" takes Sinkhorn where BN statistics are re-estimated after the step,
    # and groups without BN merge only closer channels where the means of removed ones are compensated
    ot_config = (ot_config or OTConfig()).resolved(
        recalibrated=calibration_data is not None and bool(tracking_batchnorms(model)),
        compensated=calibration_data is not None and compensate_means)
    scorer = resolve_importance(importance)
    if needs_gradients(scorer) and gradient_fn is None:
        raise ValueError("importance='taylor' needs gradients: pass gradient_fn=lambda model: loss")

    # compiled submodules are swapped for the modules they wrap for the whole step: tracing sees their
    # layers and the recorded names are those of the uncompiled model (what replay_history rebuilds)
    with eager(model) as model:
        start = time.perf_counter()
        output_before = _forward_signature(model, example_inputs)
        macs_before, params_before = count_macs_and_params(model, example_inputs)
        log = _progress if verbose else _silent
        step = _Step(example_inputs, output_before, sparsity, method, scorer, ot_config, include, exclude,
                     channel_blocks or {}, reference_widths or {}, gradient_fn, on_unsupported, log)
        snapshot = ModelSnapshot(model)
        try:
            # distilled from the statistics of the model as it is now, re-estimated after pruning
            batches, calibration = calibration_data, "" if calibration_data is None else "data"
            if calibration_data == "synthetic":
                log("distilling calibration inputs from the model's BatchNorm statistics")
                batches, calibration = synthesize_inputs(model, example_inputs), "synthetic"
            if calibration and compensate_means:
                if iter(batches) is batches:  # a one-shot iterator: read once, used twice
                    batches = list(itertools.islice(batches, calibration_batches))
                log("measuring the mean inputs of layers with a bias")
                step.input_means = consumer_input_means(model, batches, calibration_batches)
            try:
                group_reports, removals, skipped = step.run(model)
            except ForwardBrokenError:
                if on_unsupported == "raise":
                    raise
                # a width the forward depends on outside the graph (e.g. a reshape to the embedding width):
                # find the groups that break it, one at a time, and prune the others
                snapshot.restore()
                log("the pruned model no longer runs: trying each group on its own")
                group_reports, removals, skipped = step.run(model, leave_out=step.groups_breaking_the_forward(model))
            if calibration:
                log("re-estimating BatchNorm statistics")
                recalibrate_batchnorm(model, batches, calibration_batches)
        except BaseException:
            snapshot.restore()
            raise
        finally:
            if needs_gradients(scorer):
                model.zero_grad(set_to_none=True)
        macs_after, params_after = count_macs_and_params(model, example_inputs)
        report = PruneReport(
            method=method, sparsity=float(sparsity), params_before=params_before, params_after=params_after,
            macs_before=macs_before, macs_after=macs_after, seconds=time.perf_counter() - start,
            groups=group_reports, skipped=skipped, calibration=calibration, removals=[list(r) for r in removals],
        )
        log(str(report))
        if report.unsupported:
            listing = "; ".join(f"{name!r} ({why[len(UNSUPPORTED):]})" for name, why in report.unsupported.items())
            warnings.warn(f"prune(on_unsupported='skip') left {len(report.unsupported)} channel group(s) "
                          f"unpruned: {listing}", stacklevel=2)
        return report


def _progress(message: str) -> None:
    print(f"[prune] {message}", flush=True)


def _silent(message: str) -> None:
    pass


class ForwardBrokenError(RuntimeError):
    """The pruned model no longer runs on the example inputs (the step is rolled back); ``reason`` is the
    forward's own error."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class _Step:
    """One pruning step's settings; :meth:`run` decides, fuses and removes on a model (no rollback: the
    caller holds the snapshot)."""

    example_inputs: Any
    output_before: "_Signature"
    sparsity: float
    method: str
    scorer: Any
    ot_config: OTConfig
    include: Optional[Sequence[str]]
    exclude: Optional[Sequence[str]]
    channel_blocks: Mapping[str, int]
    reference_widths: Mapping[str, int]
    gradient_fn: Optional[Callable[[nn.Module], Tensor]]
    on_unsupported: str
    log: Callable[[str], None]
    input_means: Optional[Mapping[str, Tensor]] = None  # of consumer layers, for mean compensation

    def select(self, model: nn.Module) -> Tuple[tp.DependencyGraph, List[PrunableGroup], Dict[str, str]]:
        self.log("tracing the model and building its dependency graph")
        graph = build_graph(model, self.example_inputs)
        selected, skipped = _select_groups(graph, self.include, self.exclude, self.channel_blocks, self.on_unsupported)
        selected = _check_reordered_channels(model, self.example_inputs, selected, self.on_unsupported, skipped)
        return graph, selected, skipped

    def run(self, model: nn.Module, leave_out: Optional[Mapping[str, str]] = None, only: Optional[str] = None
            ) -> Tuple[List[GroupReport], List[Removal], Dict[str, str]]:
        """Prune the selected groups, except those in ``leave_out`` (``{root: reason}``, reported as
        skipped), or only the group ``only``; raises :class:`ForwardBrokenError` if the result no longer runs."""
        graph, selected, skipped = self.select(model)
        skipped.update({g.root_name: leave_out[g.root_name] for g in selected if g.root_name in (leave_out or {})})
        selected = [g for g in selected if g.root_name not in skipped and only in (None, g.root_name)]
        if needs_gradients(self.scorer):
            _accumulate_gradients(model, self.gradient_fn)
        group_reports, removals = _prune_groups(graph, selected, self.sparsity, self.method, self.scorer, self.ot_config,
                                                self.reference_widths, self.channel_blocks, self.log, self.input_means)
        _check_still_runs(model, self.example_inputs, self.output_before)
        return group_reports, removals, skipped

    def groups_breaking_the_forward(self, model: nn.Module) -> Dict[str, str]:
        """Every selected group pruned on its own (and rolled back): those after which the model no longer
        runs, with the reason to report."""
        breaking = {}
        for group in self.select(model)[1]:
            trial = ModelSnapshot(model)
            try:
                self.run(model, only=group.root_name)
            except ForwardBrokenError as err:
                breaking[group.root_name] = (f"{UNSUPPORTED}pruning it breaks the model's forward ({err.reason}), "
                                             "which depends on its width outside the dependency graph")
            finally:
                trial.restore()
        return breaking


def _check_arguments(model: Any, sparsity: float, method: str, ot_config: Any, include: Any, exclude: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {list(METHODS)}")
    if ot_config is not None and not isinstance(ot_config, OTConfig):
        raise TypeError(f"ot_config must be an OTConfig, got {type(ot_config).__name__}")
    for label, globs in (("include", include), ("exclude", exclude)):
        if globs is not None and (isinstance(globs, str) or not all(isinstance(g, str) for g in globs)):
            raise TypeError(f"{label} must be a list of module-name globs, got {globs!r}")


class _Signature(NamedTuple):
    """What pruning must not change about a forward pass: the output shapes, and the shape of every
    attention computation but its head count (see :class:`_AttentionCalls`)."""

    outputs: List[Tuple[int, ...]]
    attention: List[Tuple[Any, ...]]


class _AttentionCalls(TorchFunctionMode):
    """Records every ``scaled_dot_product_attention`` call as (batch dims, query tokens, key tokens, head
    size), and every matrix product of two activations of 4 or more dims (attention written out:
    ``q @ k.transpose(-2, -1)``, ``weights @ v``) as both operands' shapes without the head dim (-3)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: List[Tuple[Any, ...]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key = (list(args) + [kwargs.get("query"), kwargs.get("key")][len(args):])[:2]
            if isinstance(query, Tensor) and isinstance(key, Tensor) and query.dim() >= 3:
                self.shapes.append(("attention", tuple(query.shape[:-3]), int(query.shape[-2]), int(key.shape[-2]),
                                    int(query.shape[-1])))
        elif getattr(func, "__name__", "") in ("matmul", "__matmul__") and len(args) == 2 and all(
                isinstance(a, Tensor) and not isinstance(a, nn.Parameter) and a.dim() >= 4 for a in args):
            a, b = args
            self.shapes.append(("product", tuple(a.shape[:-3]) + tuple(a.shape[-2:]), tuple(b.shape[-2:])))
        return func(*args, **kwargs)


def _forward_signature(model: nn.Module, example_inputs: Any) -> _Signature:
    calls = _AttentionCalls()
    try:
        with calls:
            out = eval_forward(model, example_inputs)
    except Exception as err:
        raise ValueError(f"the model could not be run on example_inputs ({type(err).__name__}: {err})") from err
    return _Signature([tuple(t.shape) for t in _tensors(out)], calls.shapes)


def _check_still_runs(model: nn.Module, example_inputs: Any, before: _Signature) -> None:
    advice = ("The step was rolled back; leave those layers out with exclude=[...] or include=[...], or pass "
              "on_unsupported='skip' to find and leave out the groups concerned")
    try:
        after = _forward_signature(model, example_inputs)
    except ValueError as err:
        raise ForwardBrokenError(
            f"the pruned model no longer runs ({err.__cause__}); its forward depends on a layer width that "
            f"the dependency graph does not show (e.g. a reshape to a fixed number of heads). {advice}",
            reason=f"{type(err.__cause__).__name__}: {err.__cause__}",
        ) from err
    # pruning never changes how many calls there are, except where a layer is swapped for one that calls
    # the function itself (nn.MultiheadAttention's fused path -> PrunableMultiheadAttention): compare call by call
    same_calls = len(after.attention) == len(before.attention)
    changed = next(((b, a) for b, a in zip(before.attention, after.attention) if a != b), None) if same_calls else None
    if changed is not None:
        detail = f"an attention computation had the shape (all but the head count) {changed[0]} before and {changed[1]} after"
        raise ForwardBrokenError(
            f"the pruned model still runs but attends differently ({detail}): its forward reshapes the "
            f"projections with a head count or head size that pruning did not update (an attribute of the "
            f"layer the dependency graph does not show), which would regroup tokens silently. {advice}",
            reason=f"attention regrouped: {detail}",
        )
    if after.outputs != before.outputs:
        raise RuntimeError("pruning changed the model's output shape; the step was rolled back")


def _tensors(obj: Any) -> List[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    if hasattr(obj, "to_tuple"):  # Hugging Face ModelOutput
        return _tensors(obj.to_tuple())
    return []


def _select_groups(
    graph: tp.DependencyGraph, include: Optional[Sequence[str]], exclude: Optional[Sequence[str]],
    channel_blocks: Mapping[str, int], on_unsupported: str = "raise",
) -> Tuple[List[PrunableGroup], Dict[str, str]]:
    """Names of the groups to prune (validated, before anything is modified) and why others are not."""
    selected: List[PrunableGroup] = []
    skipped: Dict[str, str] = {}
    used = {g: False for g in list(include or []) + list(exclude or []) + list(channel_blocks)}
    for group in iter_groups(graph):
        for pattern in used:
            if any(matches(name, [pattern]) for name in group.members):
                used[pattern] = True
        if group.protected:
            skipped[group.root_name] = group.protected
            continue
        if include is not None and not any(matches(p, include) for p in group.producers):
            skipped[group.root_name] = "not matched by include"
            continue
        if exclude and any(matches(m, exclude) for m in group.members):
            skipped[group.root_name] = "matched by exclude"
            continue
        if group.hidden_heads and not any(matches(p, [g]) for g in channel_blocks for p in group.producers):
            _refuse(group, "its channels meet in a matrix product of activations (attention written with explicit "
                           "matmuls?), whose head size the graph cannot see", on_unsupported, skipped,
                    advice=f"Pass channel_blocks={{{(group.producers or [group.root_name])[0]!r}: head_dim}} to prune "
                           "whole heads, or leave it out with exclude=[...]")
            continue
        if group.unsupported:
            _refuse(group, group.unsupported, on_unsupported, skipped)
            continue
        selected.append(group)
    unused = [p for p, hit in used.items() if not hit]
    if unused:
        kinds = sorted({type(m).__name__ for n, m in graph.model.named_modules() if n and matches(n, unused)})
        hint = f" (they match only modules of type {', '.join(kinds)}, none of them a prunable layer)" if kinds else ""
        raise ValueError(f"module-name globs matched no prunable layer: {unused}{hint}")
    return selected, skipped


def _check_reordered_channels(model: nn.Module, example_inputs: Any, groups: Sequence[PrunableGroup],
                              on_unsupported: str, skipped: Dict[str, str]) -> List[PrunableGroup]:
    """Groups whose channels are reshaped and transposed (outside attention) are probed before anything
    is changed: the graph does not follow a channel permutation such as a ShuffleNet shuffle. Returns
    the groups that may be pruned."""
    kept = []
    for group in groups:
        if group.reordered and not channel_mapping_holds(model, example_inputs, group):
            _refuse(group, "its channels are reshaped and their order changed on the way to the next layer (a "
                           "channel shuffle?), which the dependency graph does not follow", on_unsupported, skipped)
        else:
            kept.append(group)
    return kept


def _refuse(group: PrunableGroup, reason: str, on_unsupported: str, skipped: Dict[str, str],
            advice: str = "Leave it out with exclude=[...] (module-name globs)") -> None:
    """Raise :class:`UnsupportedModelError` for a group that cannot be pruned exactly, or (``"skip"``)
    record it in ``skipped``."""
    if on_unsupported == "raise":
        raise UnsupportedModelError(f"cannot prune the channel group of {group.root_name!r}: {reason}. {advice}.")
    skipped[group.root_name] = UNSUPPORTED + reason


def _accumulate_gradients(model: nn.Module, gradient_fn: Callable[[nn.Module], Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss = gradient_fn(model)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("gradient_fn must return a scalar loss tensor")
        loss.backward()


def _prune_groups(
    graph: tp.DependencyGraph, groups: Sequence[PrunableGroup], sparsity: float, method: str, scorer: Any,
    config: OTConfig, reference_widths: Mapping[str, int], channel_blocks: Mapping[str, int],
    log: Callable[[str], None] = _silent, input_means: Optional[Mapping[str, Tensor]] = None,
) -> Tuple[List[GroupReport], List[Removal]]:
    """Fuse every group (values only; shapes unchanged), then remove all channels in one pass. With
    ``input_means`` (see :func:`~lightning_intrafusion.compensation.consumer_input_means`) the mean
    contribution of what is removed without being merged moves into the consumers' biases."""
    reports: List[GroupReport] = []
    entries = []
    for number, group in enumerate(groups, 1):
        started = time.perf_counter()
        group.refresh()
        unit = _block_size(group, channel_blocks)
        keep = _kept_width(group, sparsity, reference_widths.get(group.root_name), unit)
        report = GroupReport(group.root_name, group.width, keep, members=list(group.members))
        reports.append(report)
        if keep >= group.width:
            log(f"group {number}/{len(groups)} {group.root_name}: {group.width} channels, none to remove")
            continue
        scores = score_group(scorer, group)
        if scores is None or len(scores) != group.width or not torch.isfinite(scores).all():
            raise RuntimeError(f"importance returned no valid score for group {group.root_name!r}")
        scores = scores.detach().double().cpu()
        kept = _choose_kept(scores, keep, group.blocks, unit)
        removed = torch.tensor(complement(group.width, _expand_index(kept, unit).tolist()), dtype=torch.long)
        transport = None
        if method == "intrafusion":
            group_config = config.for_group(heads=unit > 1, batch_normalized=bool(group.folds), depthwise=group.depthwise)
            transport = _expand_units(_transport(group, scores, kept, unit, group_config), unit)
        # from the consumer columns as they are before fusion
        shifts = lost_mean_shifts(group.slices, input_means, _lost_shares(group.width, removed, transport)) if input_means else {}
        if transport is not None:
            report.merged = _fuse(graph, group, transport, kept, unit, group_config)
        _shift_biases(graph.model, shifts)
        entries.extend(group.removals(removed))
        if unit > 1 and all(side in ("out", "in") for _, side, _ in group.layers):  # heads removed as plain layer rows
            entries.extend(head_count_removals(graph.model, group.producers, group.width, group.head_size or unit, unit,
                                               removed.tolist()))
        merged = f", {report.merged} merged" if method == "intrafusion" else ""
        log(f"group {number}/{len(groups)} {group.root_name}: {group.width} -> {keep} channels{merged} "
            f"({time.perf_counter() - started:.2f} s)")
    names = {m: n for n, m in graph.model.named_modules()}
    removals = merge_removals(entries, names)
    apply_removals(graph.model, removals)
    return reports, removals


def _fuse(graph: tp.DependencyGraph, group: PrunableGroup, transport: Tensor, kept: Tensor, unit: int,
          config: OTConfig) -> int:
    """Merge all channels of ``group`` into the kept ones along the transport map (kept channels x all
    channels; values only, shapes are unchanged until the removal). Returns how many removed channels
    were merged somewhere."""
    channels = _expand_index(kept, unit)
    merged = int((transport.sum(0) > 0).sum().item()) - len(channels)
    if merged == 0 and not (config.correct_variance and _batchnorm_after_consumers(graph, group)):
        return 0  # every kept channel keeps only itself: nothing to merge, nothing to correct
    # channel similarities, once per group: norm preservation, BN statistics and the variance estimate share them
    similarity = channel_gram(group.slices, group.folds, ("producer",))
    mats = merge_matrices(transport, channels, config.producer_merge, config.consumer_merge,
                          similarity if config.preserve_norm else None)
    fused = fuse_group(group.slices, group.folds, mats, channels, channel_correlation(similarity))
    if config.correct_variance:
        ratios = output_variance_ratios(group.slices, similarity, mats["producer"], channels, fused)
        _correct_following_batchnorms(graph, group, ratios)
    _assign(group, fused)
    return merged


def _lost_shares(width: int, removed: Tensor, transport: Optional[Tensor]) -> Tensor:
    """The share of each channel's contribution that goes nowhere: 1 for every removed channel under plain
    pruning (``transport`` None); under fusion, what the transport map (kept x all channels) does not send to
    a kept channel."""
    if transport is None:
        lost = torch.zeros(width, dtype=torch.float64)
        lost[removed] = 1.0
        return lost
    lost = (1.0 - transport.sum(0)).clamp_min(0)
    return torch.where(lost < 1e-9, torch.zeros_like(lost), lost)


def _shift_biases(model: nn.Module, shifts: Mapping[str, Tensor]) -> None:
    """Add each shift to the bias of the layer whose weight it is keyed by (rebinding its data, never
    writing into the old storage, which the step's snapshot holds)."""
    for key, shift in shifts.items():
        bias = model.get_parameter(key[: -len("weight")] + "bias")
        bias.data = bias.data + shift.to(device=bias.device, dtype=bias.dtype)


def _block_size(group: PrunableGroup, channel_blocks: Mapping[str, int]) -> int:
    sizes = {int(size) for pattern, size in channel_blocks.items() if any(matches(p, [pattern]) for p in group.producers)}
    if len(sizes) > 1:
        raise ValueError(f"conflicting channel_blocks sizes {sorted(sizes)} for group {group.root_name!r}")
    unit = sizes.pop() if sizes else group.unit
    if unit % group.unit:
        raise ValueError(f"channel_blocks size {unit} of group {group.root_name!r} is not a multiple of its "
                         f"head size {group.unit}")
    if unit < 1 or group.width % unit:
        raise ValueError(f"channel_blocks size {unit} does not divide the width {group.width} of group {group.root_name!r}")
    return unit


def _kept_width(group: PrunableGroup, sparsity: float, reference: Optional[int], unit: int) -> int:
    """Channels to keep: ``round((1 - sparsity) * reference)``, at least one per norm block and unit,
    a multiple of both, never more than now."""
    step = group.blocks * unit
    base = group.width if reference is None else int(reference)
    keep = int(round((1.0 - sparsity) * base / step)) * step
    return min(group.width, max(step, keep))


def _choose_kept(scores: Tensor, keep: int, blocks: int, unit: int) -> Tensor:
    """Indices (in units) of the kept units: the top scores, equally many in each norm block."""
    unit_scores = scores.reshape(-1, unit).sum(1)
    per_block = len(unit_scores) // blocks
    keep_units = keep // unit // blocks
    kept = []
    for b in range(blocks):
        block = unit_scores[b * per_block:(b + 1) * per_block]
        # stable sort: ties resolve to the lower index, so the choice is deterministic
        order = torch.sort(-block, stable=True).indices[:keep_units]
        kept.append(torch.sort(order).values + b * per_block)
    return torch.cat(kept)


def _transport(group: PrunableGroup, scores: Tensor, kept: Tensor, unit: int, config: OTConfig) -> Tensor:
    """Block-diagonal transport map (kept units x all units) of the whole group. With the ``p=2`` ground metric
    the costs come from inner products of the channel features with the kept ones', summed one weight
    tensor at a time (:func:`~lightning_intrafusion.fusion.channel_gram`): the features are never concatenated."""
    roles = ("producer",) if config.features == "producer" else ("producer", "consumer")
    if config.p == 2:
        cross = ot_math.unit_inner_products(
            channel_gram(group.slices, group.folds, roles, columns=_expand_index(kept, unit)), unit)
        norms = channel_square_norms(group.slices, group.folds, roles).reshape(-1, unit).sum(1)

        def cost_between(sources: Tensor, rows: Tensor) -> Tensor:
            return ot_math.cost_from_inner_products(cross[sources][:, rows.to(cross.device)], norms[sources],
                                     norms[kept[rows].to(norms.device)], normalize=config.normalize_features)
    else:
        features = channel_features(group.slices, group.folds, roles)
        features = features.reshape(-1, unit * features.shape[1])

        def cost_between(sources: Tensor, rows: Tensor) -> Tensor:
            return ot_math.feature_cost(features[sources], features[kept[rows]], p=config.p,
                                        normalize=config.normalize_features)
    unit_scores = scores.reshape(-1, unit).sum(1)
    n_units = group.width // unit
    per_block = n_units // group.blocks
    transport = torch.zeros(len(kept), n_units, dtype=torch.float64)
    for b in range(group.blocks):
        lo, hi = b * per_block, (b + 1) * per_block
        rows = torch.nonzero((kept >= lo) & (kept < hi)).flatten()
        targets = kept[rows]
        cost = cost_between(torch.arange(lo, hi), rows)
        if config.solver == "emd":  # network simplex runs on the CPU; Sinkhorn stays on the weights' device
            cost = cost.cpu()
        weights = unit_scores[lo:hi] if config.marginals == "importance" else None
        a = ot_math.marginal(hi - lo, weights, like=cost)
        b_ = ot_math.marginal(len(targets), unit_scores[targets] if weights is not None else None, like=cost)
        plan = ot_math.transport_plan(cost, a, b_, config, identity=targets - lo)  # kept units keep themselves
        transport[rows[:, None], torch.arange(lo, hi)[None, :]] = ot_math.transport_map(plan, a).cpu()
    return transport


def _expand_units(transport: Tensor, unit: int) -> Tensor:
    """Map over units -> map over channels (channel c of a unit goes to channel c of the target)."""
    if unit == 1:
        return transport
    return torch.kron(transport, torch.eye(unit, dtype=transport.dtype))


def _expand_index(kept: Tensor, unit: int) -> Tensor:
    if unit == 1:
        return kept
    return (kept[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1)


def _batchnorm_after_consumers(graph: tp.DependencyGraph, group: PrunableGroup) -> bool:
    return any(following_batchnorm(graph, group.targets[s.key][0]) is not None
               for s in group.slices if s.role == "consumer" and s.is_feature)


def _correct_following_batchnorms(graph: tp.DependencyGraph, group: PrunableGroup, ratios: Dict[str, Tensor]) -> None:
    """Scale the running variance of the BN after each consumer by its estimated output-variance
    change (a new buffer: the snapshot keeps the old one for a rollback)."""
    for key, ratio in ratios.items():
        norm = following_batchnorm(graph, group.targets[key][0])
        if norm is not None and norm.running_var.shape == ratio.shape:
            norm._buffers["running_var"] = norm.running_var * ratio.to(norm.running_var)


def _assign(group: PrunableGroup, tensors: Dict[str, Tensor]) -> None:
    """Put fused values in place (rebinding, never writing into the old storage)."""
    for key, value in tensors.items():
        module, attr = group.targets[key]
        current = getattr(module, attr)
        if isinstance(current, nn.Parameter):
            current.data = value
        else:
            module._buffers[attr] = value
