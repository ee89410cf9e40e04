"""One structured pruning step: choose the kept channels of every group, merge the others into them
(Intra-Fusion) or drop them (default), and commit the new shapes atomically.

The step's parts live in their own modules: which groups and channels (:mod:`~lightning_intrafusion.selection`),
transport plans (:mod:`~lightning_intrafusion.ot`), new tensors of a group (:mod:`~lightning_intrafusion.fusion`),
the removal (:mod:`~lightning_intrafusion.surgery`), the check that the result still runs
(:mod:`~lightning_intrafusion.forward_check`) and the rollback (:mod:`~lightning_intrafusion.snapshot`).
Knows Torch-Pruning (through :mod:`lightning_intrafusion.graph`); knows nothing of Lightning.
"""

from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_intrafusion import ot as ot_math
from lightning_intrafusion.calibration import recalibrate_batchnorm, tracking_batchnorms
from lightning_intrafusion.compensation import (COMPENSATIONS, LINEAR_MAX_WIDTH, ColumnUpdate, InputStatistics,
                                                consumer_input_statistics, consumer_weight, lost_linear_compensation,
                                                lost_mean_shifts, merged_linear_compensation)
from lightning_intrafusion.cost import count_macs_and_params
from lightning_intrafusion.execution import eager
from lightning_intrafusion.forward_check import ForwardBrokenError, Signature, check_still_runs, forward_signature
from lightning_intrafusion.fusion import (
    ChannelSlice,
    channel_correlation,
    channel_features,
    channel_gram,
    channel_square_norms,
    fuse_group,
    merge_matrices,
    output_variance_ratios,
)
from lightning_intrafusion.gaussian_statistics import (gaussian_input_statistics, gaussian_joint_statistics, is_norm,
                                                       modelled_layers, within_budget)
from lightning_intrafusion.graph import build_graph, following_batchnorm
from lightning_intrafusion.group import PrunableGroup
from lightning_intrafusion.importance import ImportanceLike, needs_gradients, resolve_importance, score_group
from lightning_intrafusion.ot import OTConfig
from lightning_intrafusion.reconstruction import record_outputs, refit_layers, refittable
from lightning_intrafusion.report import UNSUPPORTED, GroupReport, PruneReport
from lightning_intrafusion.selection import block_size, check_reordered_channels, choose_kept, kept_width, select_groups
from lightning_intrafusion.snapshot import ModelSnapshot
from lightning_intrafusion.surgery import (
    Removal, apply_removals, complement, head_count_removals, merge_removals, shared_parameters,
)
from lightning_intrafusion.synthetic import synthesize_inputs
from lightning_intrafusion.tied_output import column_scales, find_norms_before, scale_channels

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
    compensation: str = "linear",
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
        calibration_data: optional iterable of input batches (read once if it is a one-shot iterator); what
            removed channels contributed is compensated (``compensation``) and BatchNorm statistics are
            re-estimated on them after pruning (``calibration_batches`` caps how many are used). ``"synthetic"``: without
            any data, on inputs distilled from the unpruned model's own BN statistics
            (:func:`~lightning_intrafusion.synthetic.synthesize_inputs` with its defaults; call it yourself
            to choose their number and the optimisation steps). With it, on a model with BatchNorm and
            ``compensation="mean"`` or ``"none"``, the default ``OTConfig(solver="auto")`` takes Sinkhorn plans
            (better once statistics are re-estimated; see :meth:`OTConfig.resolved`).
        compensation: with ``calibration_data``, how the contribution of each channel that is removed without
            being merged (entirely under ``"default"``) is kept, from the inputs of the layers consuming it,
            measured on the model as it is (:mod:`~lightning_intrafusion.compensation`): ``"linear"`` (least
            squares: predicted from the kept channels, into their columns and the bias), ``"mean"`` (its mean,
            into the bias) or ``"none"``; or ``"refit"`` (:mod:`~lightning_intrafusion.reconstruction`): every
            linear layer and convolution of the pruned groups refit in forward order to reproduce its unpruned
            outputs from the inputs it now receives, so each layer also repairs what earlier ones lost (the most
            accurate measured; keeps those layers' unpruned outputs on the batches in memory and takes a pass
            over the batches per layer). Where no BatchNorm follows (transformer blocks, classifiers, MLPs),
            re-estimating statistics cannot repair the outputs, this does. Fusion then merges only closer
            channels: under ``"linear"`` near-duplicates only (``OTConfig.max_cost_regressed``: the regression
            predicts the others better than merging them), under ``"mean"`` groups without BatchNorm within
            ``OTConfig.max_cost_without_bn_compensated``, under ``"refit"`` nothing (the refit pulls every kept
            channel back to its own output, so ``"intrafusion"`` and ``"default"`` give the same model).
            Without data, ``"intrafusion"`` applies ``"linear"`` (or ``"mean"``) to the groups without BatchNorm on
            a data-free model of their consumers' inputs (``OTConfig.gaussian_compensation``, on by default;
            :mod:`~lightning_intrafusion.gaussian_statistics`); ``"none"`` turns that off too.
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
    if compensation not in COMPENSATIONS:
        raise ValueError(f"Unknown compensation {compensation!r}; expected one of {list(COMPENSATIONS)}")
    # the step's settings: what fusion may merge and with which solver depend on what repairs follow it (BN
    # re-estimation, compensation of removed channels); see OTConfig.resolved
    ot_config = (ot_config or OTConfig()).resolved(
        recalibrated=calibration_data is not None and bool(tracking_batchnorms(model)),
        regressed=calibration_data is not None and compensation in ("linear", "refit"))
    scorer = resolve_importance(importance)
    if needs_gradients(scorer) and gradient_fn is None:
        raise ValueError("importance='taylor' needs gradients: pass gradient_fn=lambda model: loss")

    # compiled submodules are swapped for the modules they wrap for the whole step: tracing sees their
    # layers and the recorded names are those of the uncompiled model (what replay_history rebuilds)
    with eager(model) as model:
        start = time.perf_counter()
        output_before = forward_signature(model, example_inputs)
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
            if calibration and compensation != "none":
                if iter(batches) is batches or compensation == "refit":  # read once, used more than once
                    batches = list(itertools.islice(batches, calibration_batches))
                step.compensation, step.calibration = compensation, (batches, calibration_batches)
            elif method == "intrafusion" and ot_config.gaussian_compensation and compensation in ("linear", "mean"):
                step.compensation = compensation  # without data: on the Gaussian model of the inputs
            try:
                group_reports, removals, skipped = step.run(model)
            except ForwardBrokenError as broken:
                # a width the forward depends on outside the graph (e.g. a reshape to the embedding width):
                # find the groups that break it, one at a time, and name the first (raise) or prune the others
                snapshot.restore()
                if on_unsupported == "raise":
                    raise step.naming_a_group_breaking_the_forward(model, broken) from broken
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


@dataclass
class _Step:
    """One pruning step's settings; :meth:`run` decides, fuses and removes on a model (no rollback: the
    caller holds the snapshot)."""

    example_inputs: Any
    output_before: "Signature"
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
    compensation: str = "none"
    calibration: Optional[Tuple[Iterable[Any], Optional[int]]] = None  # (batches, at most how many) to compensate on
    statistics: Dict[str, InputStatistics] = field(default_factory=dict)  # of consumer inputs, once measured
    modelled: Dict[str, bool] = field(default_factory=dict)  # consumer key -> whether the Gaussian model describes it
    outputs: Dict[str, List[Tensor]] = field(default_factory=dict)  # unpruned layer outputs, for the refit
    unresolved: Dict[str, str] = field(default_factory=dict)  # groups Torch-Pruning could not resolve, by root

    def select(self, model: nn.Module) -> Tuple[tp.DependencyGraph, List[PrunableGroup], Dict[str, str]]:
        self.log("tracing the model and building its dependency graph")
        graph = build_graph(model, self.example_inputs)
        selected, skipped = select_groups(graph, self.include, self.exclude, self.channel_blocks, self.on_unsupported,
                                          self.unresolved)
        selected = check_reordered_channels(model, self.example_inputs, selected, self.on_unsupported, skipped)
        return graph, selected, skipped

    def run(self, model: nn.Module, leave_out: Optional[Mapping[str, str]] = None, only: Optional[str] = None
            ) -> Tuple[List[GroupReport], List[Removal], Dict[str, str]]:
        """Prune the selected groups, except those in ``leave_out`` (``{root: reason}``, reported as
        skipped), or only the group ``only``; raises :class:`ForwardBrokenError` if the result no longer runs."""
        graph, selected, skipped = self.select(model)
        skipped.update({g.root_name: leave_out[g.root_name] for g in selected if g.root_name in (leave_out or {})})
        selected = [g for g in selected if g.root_name not in skipped and only in (None, g.root_name)]
        if _fuses(self.method, self.compensation):
            find_norms_before(model, self.example_inputs, selected)
        if needs_gradients(self.scorer):
            _accumulate_gradients(model, self.gradient_fn)
        targets = self.layer_outputs(model, selected)
        modelled = self.modelled_consumers(model, selected)
        before = ModelSnapshot(model) if modelled else None

        def joint_statistics(keys: Collection[str]) -> Dict[str, InputStatistics]:
            return gaussian_joint_statistics(model, before, self.example_inputs, keys, [k for k in keys if modelled[k]])

        group_reports, removals = _prune_groups(graph, selected, self.sparsity, self.method, self.scorer, self.ot_config,
                                                self.reference_widths, self.channel_blocks, self.log,
                                                self.consumer_statistics(model, selected), self.compensation,
                                                modelled, joint_statistics)
        check_still_runs(model, self.example_inputs, self.output_before)
        if targets:
            self.log(f"refitting {len(targets)} layer(s) on the calibration data, in forward order")
            refit_layers(model, self.calibration[0], targets, _kept_outputs(removals, targets))
        return group_reports, removals, skipped

    def layer_outputs(self, model: nn.Module, groups: Sequence[PrunableGroup]) -> Dict[str, List[Tensor]]:
        """For ``compensation="refit"``: the outputs of the groups' refittable layers on the calibration batches,
        in the order the forward pass calls them; recorded once per step, before anything is pruned."""
        if self.calibration is None or self.compensation != "refit":
            return {}
        modules = {id(m): n for n, m in model.named_modules()}
        shared = set(shared_parameters(model))  # a tied weight serves other layers too: never refit
        names = {modules[id(module)] for g in groups for module, _ in g.targets.values()
                 if id(module) in modules and refittable(module)
                 and not any(id(p) in shared for p in module.parameters(recurse=False))}
        missing = names - set(self.outputs)
        if missing:
            self.log(f"recording the outputs of {len(missing)} layer(s) on the calibration data")
            # one pass over every layer asked for so far keeps them all in call order (later runs of the step
            # ask for subsets: the model is unpruned again, and the recordings still hold)
            self.outputs = record_outputs(model, self.calibration[0], sorted(names | set(self.outputs)))
        return {name: self.outputs[name] for name in self.outputs if name in names}

    def consumer_statistics(self, model: nn.Module, groups: Sequence[PrunableGroup]) -> Dict[str, InputStatistics]:
        """Input statistics of the layers consuming ``groups`` on the calibration batches, with second moments
        for linear compensation (inputs no wider than ``LINEAR_MAX_WIDTH``); without calibration data, those of
        the groups without BatchNorm on the Gaussian model of the inputs (``OTConfig.gaussian_compensation``,
        unless ``compensate_merged``: see :meth:`modelled_consumers`), except groups whose channels pass through a
        norm (a residual stream's width): the model draws those channels independently, so it could not predict
        one from the others. Measured once per step, on the model as it is before anything is pruned."""
        if self.compensation not in ("linear", "mean") or (self.calibration is None and self.ot_config.compensate_merged):
            return {}
        if self.calibration is None:
            groups = _modelled_groups(groups)
        consumers = _consumer_widths(groups)
        missing = set(consumers) - set(self.statistics)
        if missing:
            second = {k for k in missing if self.compensation == "linear" and consumers[k] <= LINEAR_MAX_WIDTH}
            if self.calibration is None:
                self.log(f"modelling the inputs of {len(missing)} consumer layer(s) without data")
                second = within_budget({k: consumers[k] for k in second})
                self.statistics.update(gaussian_input_statistics(model, self.example_inputs, missing, second))
            else:
                self.log(f"measuring the inputs of {len(missing)} consumer layer(s) on the calibration data")
                batches, limit = self.calibration
                self.statistics.update(consumer_input_statistics(model, batches, limit, keys=missing, second_moments=second))
        return {k: self.statistics[k] for k in consumers if k in self.statistics}

    def modelled_consumers(self, model: nn.Module, groups: Sequence[PrunableGroup]) -> Dict[str, bool]:
        """Without calibration data, under ``OTConfig.compensate_merged``: the layers consuming the groups without
        BatchNorm whose inputs the Gaussian model describes (as for :meth:`consumer_statistics`), each with whether
        its joint second moments (before and after fusion) are kept: linear compensation, within the budget; the
        others get the means only. Found once per step, on the model before anything is pruned."""
        if (self.compensation not in ("linear", "mean") or self.calibration is not None
                or not self.ot_config.compensate_merged):
            return {}
        consumers = _consumer_widths(_modelled_groups(groups))
        missing = set(consumers) - set(self.modelled)
        if missing:
            self.log(f"modelling the inputs of {len(missing)} consumer layer(s) without data")
            found = modelled_layers(model, self.example_inputs, missing)
            self.modelled.update({k: k in found for k in missing})
        modelled = [k for k in consumers if self.modelled.get(k)]
        second = {k for k in modelled if self.compensation == "linear" and consumers[k] <= LINEAR_MAX_WIDTH}
        second = within_budget({k: 2 * consumers[k] for k in second})  # moments of then and now: 2m x 2m
        return {k: k in second for k in modelled}

    def groups_breaking_the_forward(self, model: nn.Module) -> Dict[str, str]:
        """Every selected group pruned on its own (and rolled back): those after which the model no longer
        runs, with the reason to report."""
        return {root: (f"{UNSUPPORTED}pruning it breaks the model's forward ({err.reason}), which depends on its "
                       "width outside the dependency graph") for root, err in self._breaking_groups(model)}

    def naming_a_group_breaking_the_forward(self, model: nn.Module, broken: ForwardBrokenError) -> ForwardBrokenError:
        """``broken`` (the whole step broke the forward) restated with the first group that breaks it when
        pruned on its own, found by trying the groups one at a time (each rolled back); ``broken`` itself
        if none does alone."""
        root, err = next(self._breaking_groups(model), (None, None))
        if root is None:
            return broken
        return ForwardBrokenError(
            f"with the channel group of {root!r} pruned on its own, {err.problem}", reason=err.reason,
            advice=f"The step was rolled back; pass on_unsupported='skip' to leave out every group that breaks "
                   f"the forward and prune the others, or leave out the layers concerned with exclude=[...] "
                   f"(module-name globs; exclude=[{root!r}] leaves out every group that layer is in)")

    def _breaking_groups(self, model: nn.Module) -> Iterator[Tuple[str, ForwardBrokenError]]:
        """Each selected group pruned on its own and rolled back (before anything is yielded)."""
        for group in self.select(model)[1]:
            trial, broken = ModelSnapshot(model), None
            try:
                self.run(model, only=group.root_name)
            except ForwardBrokenError as err:
                broken = err
            finally:
                trial.restore()
            if broken is not None:
                yield group.root_name, broken


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
    log: Callable[[str], None] = _silent, statistics: Optional[Mapping[str, InputStatistics]] = None,
    compensation: str = "none", modelled: Optional[Mapping[str, bool]] = None,
    joint_statistics: Optional[Callable[[Collection[str]], Dict[str, InputStatistics]]] = None,
) -> Tuple[List[GroupReport], List[Removal]]:
    """Fuse every group (values only; shapes unchanged), then remove all channels in one pass. With the
    consumers' input ``statistics`` (see :func:`~lightning_intrafusion.compensation.consumer_input_statistics`),
    what is removed without being merged is compensated (``compensation``: ``"linear"`` where second
    moments were measured, ``"mean"`` elsewhere). Without data, the groups with ``modelled`` consumers are
    compensated after every group is fused: their consumers' unpruned outputs predicted from the fused kept
    channels, on ``joint_statistics`` of the inputs before and after
    (:func:`~lightning_intrafusion.compensation.merged_linear_compensation`)."""
    reports: List[GroupReport] = []
    entries = []
    fused_groups = []  # (group, kept channels, consumer merge matrix) to compensate once all are fused
    for number, group in enumerate(groups, 1):
        started = time.perf_counter()
        group.refresh()
        unit = block_size(group, channel_blocks)
        keep = kept_width(group, sparsity, reference_widths.get(group.root_name), unit)
        report = GroupReport(group.root_name, group.width, keep, members=list(group.members))
        reports.append(report)
        if keep >= group.width:
            log(f"group {number}/{len(groups)} {group.root_name}: {group.width} channels, none to remove")
            continue
        scores = score_group(scorer, group)
        if scores is None or len(scores) != group.width or not torch.isfinite(scores).all():
            raise RuntimeError(f"importance returned no valid score for group {group.root_name!r}")
        scores = scores.detach().double().cpu()
        kept = choose_kept(scores, keep, group.blocks, unit)
        removed = torch.tensor(complement(group.width, _expand_index(kept, unit).tolist()), dtype=torch.long)
        transport = None
        modelled_group = compensation in ("linear", "mean") and any(s.key in (modelled or {}) for s in group.slices)
        compensated = compensation in ("linear", "mean") and any(s.key in (statistics or {}) for s in group.slices)
        if _fuses(method, compensation):
            group_config = config.for_group(heads=unit > 1, batch_normalized=bool(group.folds), depthwise=group.depthwise,
                                            compensated=compensated)
            transport = _expand_units(_transport(group, scores, kept, unit, group_config), unit)
        # from the consumer columns as they are before fusion
        updates, shifts = {}, {}
        if statistics and compensation != "none":
            lost = _lost_shares(group.width, removed, transport)
            if compensation == "linear":
                updates = lost_linear_compensation(group.slices, statistics, lost, _expand_index(kept, unit))
                updates = {key: update for key, update in updates.items() if key not in group.tied}
            shifts = lost_mean_shifts([s for s in group.slices if s.key not in updates], statistics, lost)
        if transport is not None:
            # a tied weight (an embedding shared with the output layer) cannot be averaged as the one and summed
            # as the other: its columns are only removed, every other tensor of the group is fused
            report.merged, folded, mats = _fuse(graph, group, transport, kept, unit, group_config, leave=group.tied)
            if modelled_group:
                fused_groups.append((group, _expand_index(kept, unit), mats["consumer"]))
        _shift_biases(graph.model, shifts)
        _update_columns(graph.model, updates)
        entries.extend(group.removals(removed))
        if unit > 1 and all(side in ("out", "in") for _, side, _ in group.layers):  # heads removed as plain layer rows
            entries.extend(head_count_removals(graph.model, group.producers, group.width, group.head_size or unit, unit,
                                               removed.tolist(), group.counts))
        merged = f", {report.merged} merged" if transport is not None else ""
        if group.tied and transport is not None:
            merged += (f" (the tied weight's columns removed, not merged; {folded} scales them)" if folded
                       else " (the tied weight's columns removed, not merged)")
        log(f"group {number}/{len(groups)} {group.root_name}: {group.width} -> {keep} channels{merged} "
            f"({time.perf_counter() - started:.2f} s)")
    if fused_groups and joint_statistics is not None:
        _compensate_fused(graph.model, fused_groups, joint_statistics, log)
    names = {m: n for n, m in graph.model.named_modules()}
    removals = merge_removals(entries, names)
    apply_removals(graph.model, removals)
    return reports, removals


def _compensate_fused(model: nn.Module, fused_groups: Sequence[Tuple[PrunableGroup, Tensor, Tensor]],
                      joint_statistics: Callable[[Collection[str]], Dict[str, InputStatistics]],
                      log: Callable[[str], None]) -> None:
    """Linear compensation on the fused model, before anything is removed: every consumer of the groups in
    ``fused_groups`` (group, kept channels, consumer merge matrix) predicts its unpruned output from the fused
    kept channels (:func:`~lightning_intrafusion.compensation.merged_linear_compensation`)."""
    keys = {s.key for group, _, _ in fused_groups for s in group.slices if consumer_weight(s) is not None}
    log(f"compensating {len(keys)} consumer layer(s) on modelled inputs, before and after fusion")
    statistics = joint_statistics(keys)
    updates: Dict[str, ColumnUpdate] = {}
    for group, channels, merge in fused_groups:
        group.refresh()
        found = merged_linear_compensation(group.slices, statistics, merge, channels)
        updates.update({key: update for key, update in found.items() if key not in group.tied})
    _update_columns(model, updates)


def _modelled_groups(groups: Sequence[PrunableGroup]) -> List[PrunableGroup]:
    """The groups the Gaussian model of the inputs can compensate: without BatchNorm, no norm among their layers."""
    return [g for g in groups if not g.folds and not any(is_norm(m) for m, _ in g.targets.values())]


def _consumer_widths(groups: Sequence[PrunableGroup]) -> Dict[str, int]:
    """The input width of every consumer weight of ``groups``, by key."""
    return {s.key: weight.shape[1] for g in groups for s in g.slices for weight in [consumer_weight(s)] if weight is not None}


def _fuses(method: str, compensation: str) -> bool:
    """Whether a step merges channels: Intra-Fusion does, except under the refit, which pulls every kept channel
    back to its own unpruned output, which a merge into it contradicts (its merged BN parameters and consumer
    columns would stay)."""
    return method == "intrafusion" and compensation != "refit"


def _fuse(graph: tp.DependencyGraph, group: PrunableGroup, transport: Tensor, kept: Tensor, unit: int,
          config: OTConfig, leave: Collection[str] = ()) -> Tuple[int, Optional[str], Dict[str, Tensor]]:
    """Merge all channels of ``group`` into the kept ones along the transport map (kept channels x all
    channels; values only, shapes are unchanged until the removal), in every tensor but those keyed in
    ``leave`` (left as they are: a tied output layer's, made up for by the norm before it where there is one,
    see :mod:`~lightning_intrafusion.tied_output`). Returns how many removed channels were merged somewhere,
    the name of the norm that makes up for a tied output layer, if one does, and the merge matrices."""
    channels = _expand_index(kept, unit)
    merged = int((transport.sum(0) > 0).sum().item()) - len(channels)
    if merged == 0 and not (config.correct_variance and _batchnorm_after_consumers(graph, group)):
        identity = torch.zeros(len(channels), transport.shape[1], dtype=torch.float64)
        identity[torch.arange(len(channels)), channels] = 1.0
        # every kept channel keeps only itself: nothing to merge, nothing to correct
        return 0, None, {"producer": identity, "consumer": identity}
    slices = [s for s in group.slices if s.key not in leave]
    # channel similarities, once per group: norm preservation, BN statistics and the variance estimate share them
    similarity = channel_gram(slices, group.folds, ("producer",))
    mats = merge_matrices(transport, channels, config.producer_merge, config.consumer_merge,
                          similarity if config.preserve_norm else None)
    fused = fuse_group(slices, group.folds, mats, channels, channel_correlation(similarity))
    if config.correct_variance:
        ratios = output_variance_ratios(slices, similarity, mats["producer"], channels, fused)
        _correct_following_batchnorms(graph, group, ratios)
    folded = _fold_tied_output(graph, group, [s for s in group.slices if s.key in leave], mats["consumer"], channels, fused)
    _assign(group, fused)
    return merged, folded, mats


def _fold_tied_output(graph: tp.DependencyGraph, group: PrunableGroup, left: Sequence[ChannelSlice], merge: Tensor,
                      kept: Tensor, fused: Dict[str, Tensor]) -> Optional[str]:
    """Make up for the unmerged columns of a tied output layer (among the slices ``left``) through the norm that
    feeds it (``group.tied_norm``; its kept channels scaled in ``fused``), where the fold is exact on the norm.
    Returns the norm's name, or None."""
    consumer = next((s for s in left if s.role == "consumer" and s.is_feature), None)
    if group.tied_norm is None or consumer is None:
        return None
    norm = graph.model.get_submodule(group.tied_norm)
    keys = {leaf: f"{group.tied_norm}.{leaf}" for leaf in ("weight", "bias") if getattr(norm, leaf, None) is not None}
    if any(key not in fused for key in keys.values()):
        return None
    new = scale_channels(norm, {leaf: fused[key] for leaf, key in keys.items()}, kept,
                         column_scales(merge, consumer.rows(), kept))
    if new is None:
        return None
    fused.update({keys[leaf]: value for leaf, value in new.items()})
    return group.tied_norm


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


def _kept_outputs(removals: Sequence[Removal], targets: Mapping[str, List[Tensor]]) -> Dict[str, Tensor]:
    """The output channels each refit layer keeps, from this step's removals (indices of the unpruned widths)."""
    kept = {}
    for name, side, idxs in removals:
        if side == "out" and name in targets:
            kept[name] = torch.tensor(complement(targets[name][0].shape[1], idxs), dtype=torch.long)
    return kept


def _update_columns(model: nn.Module, updates: Mapping[str, ColumnUpdate]) -> None:
    """Add linear compensation to the kept columns of each consumer weight and to its bias (rebinding,
    never writing into the old storage)."""
    for key, update in updates.items():
        weight = model.get_parameter(key)
        delta = update.weight_delta.to(device=weight.device, dtype=weight.dtype)
        if update.transposed:  # stored (in, out): x @ W
            weight.data = weight.data.index_add(0, update.positions.to(weight.device), delta.T)
        else:
            weight.data = weight.data.index_add(1, update.positions.to(weight.device), delta)
        if update.bias_delta is not None:
            _shift_biases(model, {key: update.bias_delta})


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
