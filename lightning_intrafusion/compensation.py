"""Compensation with calibration data: what a removed channel contributed need not be lost entirely.

A channel that is removed (or, under partial OT, discarded rather than merged) takes away its
contribution ``W[:, j] x_j`` to every layer that consumes it. Measured on a few batches of the model as
it is before the step (forward passes only), two repairs keep part of it:

- ``"mean"``: its *expected* part, ``W[:, j] E[x_j]``, is a constant that the consumer's bias carries.
- ``"linear"``: the best linear prediction of ``x_j`` from the channels that stay (least squares, with an
  intercept where the consumer has a bias): ``x_j ~ a_j + c_j . x_kept``, so ``W[:, j] c_j`` is added to the
  kept channels' columns and ``W[:, j] a_j`` to the bias (see :func:`lost_linear_compensation`). With ``c_j = 0`` this is the mean repair; a
  removed channel that is an exact linear combination of kept ones is not lost at all. It needs every
  consumer's ``E[x x^T]`` (``m x m`` for ``m`` inputs, kept only for consumers of pruned groups no wider than
  :data:`LINEAR_MAX_WIDTH`; wider ones get the mean repair).

Where BatchNorm follows the consumer, re-estimating its statistics absorbs a mean shift anyway; where
nothing normalises the consumer's output (transformer blocks, classifiers, plain MLPs), these repairs are
what keep the residual stream and the logits in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_intrafusion.calibration import ChannelMoments, observe_batches
from lightning_intrafusion.fusion import ChannelSlice
from lightning_intrafusion.surgery import transposed_linear_types

COMPENSATIONS = ("linear", "mean", "none", "refit")  # "refit": layer-wise reconstruction.py
LINEAR_MAX_WIDTH = 4096  # widest consumer input whose E[x x^T] is measured (4096^2 doubles: 128 MiB)
# ridge of the least squares, relative to the mean diagonal of the kept channels' (co)variance. Measured
# on the one-shot benchmark with calibration data (10 models each): 1e-4 and 1e-3 within 0.6 points of
# each other everywhere, 1e-2 up to 1.4 below on the transformers at 70%; 1e-3 keeps a margin for wide
# layers seen on few samples.
RIDGE = 1e-3


@dataclass
class InputStatistics:
    """Moments of one consumer layer's input channels over the calibration data.

    Attributes:
        mean: ``E[x]``, ``(m,)``.
        second_moment: ``E[x x^T]``, ``(m, m)``, where measured (linear compensation).
        has_bias: whether the layer has a bias to carry constant shifts.
        samples: how many input rows (tokens, pixels) the moments are over.
        ridge: the ridge of the least squares that predicts removed channels from these moments (relative, see
            :data:`RIDGE`); larger for modelled moments than for measured ones.
    """

    mean: Tensor
    second_moment: Optional[Tensor] = None
    has_bias: bool = True
    samples: int = 0
    ridge: float = RIDGE


def output_inverse(projection: nn.Linear) -> Optional[Tensor]:
    """``W^+`` (double precision) of a linear projection ``y = W x + b`` whose weight has full column rank, so
    that its input is determined by its output: ``x = W^+ (y - b)``; None where the output does not
    determine the input. For layers applied without being called (``nn.MultiheadAttention``'s ``out_proj``)."""
    weight = projection.weight.detach().double()
    if torch.linalg.matrix_rank(weight) < weight.shape[1]:
        return None
    return torch.linalg.pinv(weight)


def layer_input_hooks(model: nn.Module, wanted: Callable[[str, nn.Module], bool],
                      on_input: Callable[[str, nn.Module, Any, int], None],
                      on_attention_output: Callable[[str, nn.MultiheadAttention, Any], None]) -> List[Any]:
    """Forward hooks (handles) passing the input of every ``wanted(key, layer)`` consumer layer, by its weight's
    key, to ``on_input(key, layer, x, channel_dim)``: linear layers and Hugging Face ``Conv1D`` (channels last),
    convolutions (dim 1; transposed ones are not consumers here). ``nn.MultiheadAttention`` applies its output
    projection without calling it, so the module's output goes to ``on_attention_output(key, module, output)``
    instead (key: the projection's weight)."""
    hooks = []
    for name, module in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if isinstance(module, nn.MultiheadAttention):
            key = f"{name}.out_proj.weight" if name else "out_proj.weight"
            if wanted(key, module.out_proj):
                hooks.append(module.register_forward_hook(lambda m, args, output, key=key: on_attention_output(
                    key, m, output[0] if isinstance(output, tuple) else output)))
        elif isinstance(module, (nn.Linear,) + transposed_linear_types()) and wanted(key, module):
            hooks.append(module.register_forward_pre_hook(lambda m, args, key=key: on_input(key, m, args[0] if args else None, -1)))
        elif (isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd)
              and wanted(key, module)):
            hooks.append(module.register_forward_pre_hook(lambda m, args, key=key: on_input(key, m, args[0] if args else None, 1)))
    return hooks


@torch.no_grad()
def consumer_input_statistics(model: nn.Module, batches: Iterable[Any], max_batches: Optional[int] = None,
                              keys: Optional[Collection[str]] = None,
                              second_moments: Collection[str] = (),
                              product_dtype: torch.dtype = torch.float64) -> Dict[str, InputStatistics]:
    """Input statistics of the layers whose weight keys (``"blocks.0.fc2.weight"``) are in ``keys`` (default:
    every layer with a bias), with ``E[x x^T]`` for those in ``second_moments`` (its products computed in
    ``product_dtype``, see :class:`~lightning_intrafusion.calibration.ChannelMoments`). Linear layers (channels along
    the last dim; also Hugging Face's ``Conv1D``), convolutions (dim 1; grouped ones never get second moments) and
    the output projection
    of ``nn.MultiheadAttention``, which the module applies without calling it: its input statistics follow
    from the module's output ``y = W x + b`` where ``W`` has full column rank (``x = W^+ (y - b)``).
    The model runs in eval mode; modes are restored."""
    moments: Dict[str, ChannelMoments] = {}
    has_bias: Dict[str, bool] = {}

    def add(key: str, values: Any, dim: int, cross: bool) -> None:
        if isinstance(values, Tensor) and values.dim() > 0:
            moments.setdefault(key, ChannelMoments(dim, cross, product_dtype)).add(values)

    def wanted(key: str, layer: nn.Module) -> bool:
        return key in keys if keys is not None else getattr(layer, "bias", None) is not None

    hooks = []
    attention_outputs: Dict[str, nn.MultiheadAttention] = {}

    def on_input(key: str, layer: nn.Module, x: Any, dim: int) -> None:
        has_bias[key] = layer.bias is not None
        add(key, x, dim, key in second_moments and getattr(layer, "groups", 1) == 1)

    def on_attention_output(key: str, module: nn.MultiheadAttention, output: Any) -> None:
        attention_outputs[key] = module
        has_bias[key] = module.out_proj.bias is not None
        add(key + ".output", output, -1, key in second_moments)

    hooks = layer_input_hooks(model, wanted, on_input, on_attention_output)
    observe_batches(model, batches, max_batches, "calibration_data", hooks)
    # (mean, E[x x^T] or None) per key, each computed once
    computed = {key: (m.mean(), m.second_moment() if m.cross else None) for key, m in moments.items()}
    for key, (mean, second) in computed.items():
        if not (torch.isfinite(mean).all() and (second is None or torch.isfinite(second).all())):
            layer = key[: -len(".output")] if key.endswith(".output") else key[: -len(".weight")]
            raise ValueError(f"calibration_data gave non-finite (NaN or inf) inputs to layer {layer!r}: check the "
                             "batches, or the model's outputs on them")
    stats = {key: InputStatistics(*computed[key], has_bias[key], m.count)
             for key, m in moments.items() if not key.endswith(".output")}
    for key, module in attention_outputs.items():
        seen = moments.get(key + ".output")
        if seen is None or key in stats:  # never ran, or its projection was called as a layer (and seen)
            continue
        inverse = output_inverse(module.out_proj)
        if inverse is None:
            continue
        seen_mean, seen_second = computed[key + ".output"]
        bias = module.out_proj.bias.detach().double() if has_bias[key] else torch.zeros_like(seen_mean)
        mean = inverse @ (seen_mean - bias)
        second = None
        if seen_second is not None:  # E[(y - b)(y - b)^T] mapped back
            centred = seen_second - torch.outer(seen_mean, bias) - torch.outer(bias, seen_mean) + torch.outer(bias, bias)
            second = inverse @ centred @ inverse.T
        stats[key] = InputStatistics(mean, second, has_bias[key], seen.count)
    return stats


def lost_mean_shifts(slices: Sequence[ChannelSlice], statistics: Dict[str, InputStatistics], lost: Tensor) -> Dict[str, Tensor]:
    """For every consumer weight of a group whose input means are known and that has a bias: the change
    of its output's mean when each channel ``j`` loses the share ``lost[j]`` of its contribution (1:
    removed outright, 0: kept or merged whole), ``sum_j lost_j W[:, j] E[x_j]``, ``(out,)`` per weight key.
    Adding it to the consumer's bias keeps the output's mean."""
    shifts: Dict[str, Tensor] = {}
    for s in slices:
        weight = consumer_weight(s)
        if weight is None or s.key not in statistics or not statistics[s.key].has_bias:
            continue
        n, c = s.positions.shape
        columns = weight.index_select(1, s.positions.reshape(-1).to(weight.device)).reshape(weight.shape[0], n, -1).double()
        mean = statistics[s.key].mean.to(columns.device)[s.positions.reshape(-1).to(columns.device)].reshape(n, c, 1)
        mean = mean.expand(n, c, columns.shape[2] // c).reshape(n, -1)
        shifts[s.key] = torch.einsum("onm,nm,n->o", columns, mean, lost.to(columns))
    return shifts


def consumer_weight(s: ChannelSlice) -> Optional[Tensor]:
    """A consumer's weight as ``(out, in, *kernel)`` (the group's channels along dim 1): as it is for linear
    layers and convolutions, transposed for a 2-D weight that holds them along dim 0 (Hugging Face's
    ``Conv1D``, ``x @ W``); None for the others (grouped convolutions, biases, norm parameters)."""
    if s.role != "consumer" or not s.is_feature or type(s) is not ChannelSlice:
        return None
    weight = s.tensor.detach()
    if s.dim == 1:
        return weight
    return weight.T if s.dim == 0 and weight.dim() == 2 else None


@dataclass
class ColumnUpdate:
    """What linear compensation adds to one consumer weight: ``weight_delta`` (``(out, len(positions),
    *kernel)``) to the input columns ``positions`` (those of the kept channels; along dim 0 of the stored
    weight where it is ``transposed``), ``bias_delta`` (``(out,)``) to the bias, if the layer has one."""

    positions: Tensor
    weight_delta: Tensor
    bias_delta: Optional[Tensor]
    transposed: bool = False


def lost_linear_compensation(slices: Sequence[ChannelSlice], statistics: Dict[str, InputStatistics], lost: Tensor,
                             kept: Tensor, ridge: Optional[float] = None) -> Dict[str, ColumnUpdate]:
    """For every consumer weight of a group whose input second moments are known: the lost share of each
    channel predicted from the ``kept`` channels by ridge-regularised least squares (with an intercept where
    the consumer has a bias), as updates of the kept channels' columns and of the bias. ``ridge``: default, each
    consumer's statistics' own.

    One coefficient per pair of channels, shared by every input position a channel has: a convolution reads
    a channel at every pixel (its kernel taps share the coefficients), a linear layer after a flatten reads it
    at several positions, and channel ``j`` at position ``p`` is predicted from the kept channels at ``p``
    (intercepts per position), so the regression has as many unknowns as kept channels, not positions."""
    updates: Dict[str, ColumnUpdate] = {}
    lost_channels = torch.nonzero(lost > 0).flatten()
    if not len(lost_channels):
        return updates
    for s in slices:
        stats = statistics.get(s.key)
        weight = consumer_weight(s)
        if weight is None or stats is None or stats.second_moment is None:
            continue
        moment, mean = stats.second_moment, stats.mean
        if stats.has_bias:  # centred per position: the intercepts go to the bias
            moment = moment - torch.outer(mean, mean)
        c = s.positions.shape[1]
        removed = s.positions[lost_channels].to(mean.device)  # (r, c) input positions
        staying = s.positions[kept].to(mean.device)  # (k, c)
        coefficients = _regression(moment, removed, staying, stats.ridge if ridge is None else ridge)  # (removed, kept)
        columns = weight.index_select(1, removed.reshape(-1).to(weight.device)).double()
        columns = columns.reshape(weight.shape[0], len(removed), c, *weight.shape[2:])
        columns = columns * lost[lost_channels].to(columns).reshape(1, -1, *([1] * (columns.dim() - 2)))
        coefficients = coefficients.to(columns.device)
        delta = torch.einsum("orp...,rk->okp...", columns, coefficients).reshape(weight.shape[0], -1, *weight.shape[2:])
        bias_delta = None
        if stats.has_bias:
            intercepts = mean[removed].to(columns.device) - coefficients @ mean[staying].to(columns.device)  # (r, c)
            bias_delta = torch.einsum("orp...,rp->o", columns, intercepts)
        updates[s.key] = ColumnUpdate(staying.reshape(-1), delta, bias_delta, transposed=s.dim == 0)
    return updates


def _regression(moment: Tensor, targets: Tensor, regressors: Tensor, ridge: float,
                prior: Optional[Tensor] = None) -> Tensor:
    """Ridge least-squares coefficients (``len(targets) x len(regressors)``, shrunk toward ``prior``, default 0)
    predicting the channels at input positions ``targets`` (``(t, c)``) from those at ``regressors`` (``(r, c)``),
    one coefficient per pair of channels pooled over their ``c`` positions, from the second moments ``moment``;
    the ridge is relative to the regressors' mean (co)variance."""
    c = targets.shape[1]

    def pooled(rows: Tensor, columns: Tensor) -> Tensor:  # sum over positions p of moment[rows[:, p], columns[:, p]]
        block = moment[rows.reshape(-1)][:, columns.reshape(-1)].reshape(len(rows), c, len(columns), c)
        return block.diagonal(dim1=1, dim2=3).sum(-1)

    gram, cross = pooled(regressors, regressors), pooled(targets, regressors)
    scale = gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    regularised = gram + ridge * scale * torch.eye(len(regressors), dtype=gram.dtype, device=gram.device)
    if prior is None:
        return torch.linalg.solve(regularised, cross.T).T
    return prior + torch.linalg.solve(regularised, (cross - prior @ gram).T).T


def merged_linear_compensation(slices: Sequence[ChannelSlice], statistics: Dict[str, InputStatistics], merge: Tensor,
                               kept: Tensor, ridge: Optional[float] = None) -> Dict[str, ColumnUpdate]:
    """Linear compensation on top of a fusion: for every consumer weight of a fused group whose joint input
    statistics are known (``statistics[key]``: moments of ``[x, x']``, the ``m`` inputs as the model computed
    them before the group was fused and the ``m`` inputs it computes now, over the same passes; see
    :func:`~lightning_intrafusion.gaussian_statistics.gaussian_joint_statistics`), what the consumer computed
    before, ``W x + b``, predicted from the fused kept channels ``x'_kept`` by ridge least squares shrunk toward
    the merge itself (with an intercept where the consumer has a bias), as updates of the kept channels' columns
    and of the bias. ``merge``: the consumer merge matrix of the fusion (``k x n``, see
    :func:`~lightning_intrafusion.fusion.merge_matrices`), so that the kept columns now are ``W merge^T``.

    Coefficients are pooled over positions as in :func:`lost_linear_compensation`. ``W`` is recovered from the
    weight as it is now (removed channels' columns untouched, kept ones merged), so merges of the consumer's
    own rows by other groups of the step are respected. Without second moments only the means are carried
    (the bias takes what the fused channels lose on average)."""
    updates: Dict[str, ColumnUpdate] = {}
    n = merge.shape[1]
    removed = torch.tensor(sorted(set(range(n)) - set(kept.tolist())), dtype=torch.long)
    for s in slices:
        stats = statistics.get(s.key)
        weight = consumer_weight(s)
        if weight is None or stats is None:
            continue
        width = stats.mean.numel() // 2
        positions = s.positions.to(stats.mean.device)
        staying = positions[kept]  # (k, c)
        source = staying + width  # the fused kept channels' positions in [x, x']
        base = _unmerged_columns(weight, s.positions, merge, kept, removed)  # (out, n, c, *kernel)
        prior = merge.double().T.to(stats.mean.device)  # (n, k): x_i ~ sum_j prior[i, j] x'_j is what the merge assumes
        coefficients = prior
        if stats.second_moment is not None:
            moment = stats.second_moment
            if stats.has_bias:
                moment = moment - torch.outer(stats.mean, stats.mean)
            coefficients = _regression(moment, positions, source, stats.ridge if ridge is None else ridge, prior)
        correction = (coefficients - prior).to(base.device)
        delta = torch.einsum("onp...,nk->okp...", base, correction).reshape(weight.shape[0], -1, *weight.shape[2:])
        bias_delta = None
        if stats.has_bias:
            # per position p: E[x_i] - sum_j coefficients[i, j] E[x'_j], carried by the columns before the merge
            intercepts = stats.mean[positions] - coefficients @ stats.mean[source]  # (n, c)
            bias_delta = torch.einsum("onp...,np->o", base, intercepts.to(base.device))
        updates[s.key] = ColumnUpdate(staying.reshape(-1).cpu(), delta, bias_delta, transposed=s.dim == 0)
    return updates


def _unmerged_columns(weight: Tensor, positions: Tensor, merge: Tensor, kept: Tensor, removed: Tensor) -> Tensor:
    """A consumer's columns for a group's ``n`` channels as they were before the group's merge (``merge``,
    ``k x n``, made the kept ones ``sum_i merge[j, i] W_i``; removed ones are untouched until removal), as
    ``(out, n, c, *kernel)`` for ``positions`` ``(n, c)``; merges of the rows by other groups stay."""
    n, c = positions.shape
    t = merge.double().to(weight.device)
    columns = weight.index_select(1, positions.reshape(-1).to(weight.device)).double()
    columns = columns.reshape(weight.shape[0], n, -1)  # (out, n, c * kernel)
    kept, removed = kept.to(weight.device), removed.to(weight.device)
    rest = columns[:, kept] - torch.einsum("kr,orx->okx", t[:, removed], columns[:, removed])
    base = columns.clone()
    base[:, kept] = torch.einsum("ak,okx->oax", torch.linalg.pinv(t[:, kept]), rest)
    return base.reshape(weight.shape[0], n, c, *weight.shape[2:])
