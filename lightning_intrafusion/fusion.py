"""Fusion of one dependency group along one transport map.

A group is described by plain tensors (:class:`ChannelSlice`): where each of its ``n`` channels
lives in every tensor it touches, and whether the tensor *produces* the channels (output rows,
biases, per-channel norm parameters) or *consumes* them (input columns of the next layer). This
module knows nothing of Torch-Pruning or Lightning; it turns a ``k x n`` map into new tensors.

Merging rules (exact when every removed channel duplicates a kept one):
producer rows are a weighted *average* of the channels merged into them, consumer columns a
weighted *sum*. A producer followed by BatchNorm (:class:`BatchNormFold`) is merged in its folded
form and re-parameterised so that eval mode computes exactly the folded merge while the BN keeps
running statistics that describe its (new) input, so train mode stays meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import torch
from torch import Tensor

Role = Literal["producer", "consumer"]


def _working_dtype(tensor: Tensor) -> torch.dtype:
    """Merges run in the weights' precision, at least single (half-precision weights are upcast)."""
    return torch.promote_types(tensor.dtype, torch.float32)


@dataclass
class ChannelSlice:
    """The channels of a group as they appear in one tensor.

    Attributes:
        key: a stable name such as ``"features.0.weight"``.
        tensor: the tensor's current values.
        dim: the dimension that indexes channels.
        positions: ``(n, c)`` long tensor; row ``r`` holds the ``c`` indices along ``dim`` that belong
            to group channel ``r`` (``c > 1`` e.g. for a linear layer after a flatten).
        role: ``"producer"`` or ``"consumer"``.
        is_feature: whether it contributes to the channel features (weights do, biases and norm
            parameters do not).
    """

    key: str
    tensor: Tensor
    dim: int
    positions: Tensor
    role: Role
    is_feature: bool = True

    def rows(self, values: Optional[Tensor] = None) -> Tensor:
        """Values as an ``(n, c * rest)`` matrix, one row per group channel (at least single precision)."""
        values = self.tensor if values is None else values
        n, c = self.positions.shape
        picked = values.detach().index_select(self.dim, self.positions.reshape(-1).to(values.device))
        return picked.movedim(self.dim, 0).reshape(n, -1).to(_working_dtype(values))

    def per_output(self, values: Optional[Tensor] = None) -> Tensor:
        """For a consumer weight (channels along dim 1, outputs along dim 0): ``(out, n, m)``, the
        entries of every output row that read each group channel (float32)."""
        values = (self.tensor if values is None else values).detach()
        picked = values.index_select(1, self.positions.reshape(-1).to(values.device))
        return picked.reshape(values.shape[0], self.positions.shape[0], -1).float()

    def write(self, rows: Tensor, kept: Tensor, base: Optional[Tensor] = None) -> Tensor:
        """A new tensor equal to ``base`` (default: the current tensor) with the kept channels'
        entries replaced by ``rows`` (``(k, c * rest)``)."""
        base = self.tensor.detach() if base is None else base
        c = self.positions.shape[1]
        idx = self.positions[kept].reshape(-1).to(base.device)
        moved_shape = list(base.movedim(self.dim, 0).shape)
        moved_shape[0] = idx.numel()
        block = rows.reshape(len(kept), c, -1).reshape(moved_shape).movedim(0, self.dim)
        return base.index_copy(self.dim, idx, block.to(dtype=base.dtype, device=base.device))


@dataclass
class GroupedInputSlice(ChannelSlice):
    """The input channels of a grouped convolution (``groups > 1``, weight ``(out, in / groups, *k)``).

    Input channel ``j`` of group ``b = j // (in / groups)`` is seen only by that group's output rows,
    at column ``j % (in / groups)``: its feature is that ``(out / groups, *k)`` block. Channels may only
    be merged within a conv group (the pruner makes the transport block-diagonal to ensure it).
    """

    groups: int = 1

    def _coordinates(self, weight: Tensor, channels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        per_group = weight.shape[1]
        view = weight.reshape(self.groups, weight.shape[0] // self.groups, per_group, *weight.shape[2:])
        idx = self.positions[channels].reshape(-1).to(weight.device)
        return view, idx // per_group, idx % per_group

    def rows(self, values: Optional[Tensor] = None) -> Tensor:
        values = (self.tensor if values is None else values).detach()
        view, block, column = self._coordinates(values, torch.arange(self.positions.shape[0]))
        return view[block, :, column].reshape(len(block), -1).to(_working_dtype(values))

    def per_output(self, values: Optional[Tensor] = None) -> Tensor:
        values = (self.tensor if values is None else values).detach()
        out, per_group = values.shape[0], values.shape[1]
        rows = out // self.groups
        dense = values.new_zeros(out, per_group * self.groups, values[0, 0].numel(), dtype=torch.float32)
        for b in range(self.groups):  # conv group b reads only its own input channels
            dense[b * rows:(b + 1) * rows, b * per_group:(b + 1) * per_group] = values[b * rows:(b + 1) * rows].reshape(rows, per_group, -1)
        return dense[:, self.positions.reshape(-1).to(values.device)]

    def write(self, rows: Tensor, kept: Tensor, base: Optional[Tensor] = None) -> Tensor:
        base = self.tensor.detach() if base is None else base
        view, block, column = self._coordinates(base.clone(), kept)
        view[block, :, column] = rows.reshape(len(kept), *view.shape[1:2], *view.shape[3:]).to(base)
        return view.reshape(base.shape)


@dataclass
class BatchNormFold:
    """A producer layer whose output channels feed straight into a BatchNorm (eval form
    ``y = gamma * (W x + b - mean) / sqrt(var + eps) + beta``)."""

    weight: ChannelSlice
    bias: Optional[ChannelSlice]
    bn_weight: ChannelSlice
    bn_bias: ChannelSlice
    running_mean: ChannelSlice
    running_var: ChannelSlice
    eps: float

    def slices(self) -> List[ChannelSlice]:
        out = [self.weight, self.bn_weight, self.bn_bias, self.running_mean, self.running_var]
        return out + ([self.bias] if self.bias is not None else [])

    def scale(self) -> Tensor:
        """``gamma / sqrt(var + eps)`` per group channel, ``(n,)`` (mean over duplicate positions)."""
        gamma = self.bn_weight.rows().mean(1)
        var = self.running_var.rows().mean(1)
        return gamma / torch.sqrt(var + self.eps)

    def folded_weight(self) -> Tensor:
        return self.weight.rows() * self.scale()[:, None]

    def folded_bias(self) -> Tensor:
        """Folded bias without beta: ``gamma * (b - mean) / sqrt(var + eps)``, ``(n,)``."""
        mean = self.running_mean.rows().mean(1)
        b = self.bias.rows().mean(1) if self.bias is not None else torch.zeros_like(mean)
        return self.scale() * (b - mean)


def merge_matrices(transport: Tensor, kept: Tensor, producer_merge: str, consumer_merge: str,
                   producer_gram: Optional[Tensor] = None) -> Dict[Role, Tensor]:
    """Turn a transport map ``T`` (k x n, columns sum to <= 1) into the matrices applied to producer
    and consumer tensors. A kept channel that received nothing keeps its own values. With
    ``producer_gram`` (the n x n Gram matrix of the producer features, see :func:`gram`) the producer
    rows are rescaled to keep the mean norm of what they merge."""
    t = transport.to(torch.float64)
    k, n = t.shape
    identity = torch.zeros_like(t)
    identity[torch.arange(k), kept.to(t.device)] = 1.0
    empty = t.sum(1) <= 0
    t = torch.where(empty[:, None], identity, t)

    def _as(mode: str) -> Tensor:
        if mode == "sum":
            return t
        return t / t.sum(1, keepdim=True)

    producer = _as(producer_merge)
    merging = torch.nonzero((t > 0).sum(1) > 1).flatten()  # rows that keep only themselves stay as they are
    if producer_gram is not None and len(merging):
        g = producer_gram.to(producer)
        norms = g.diagonal().clamp_min(0).sqrt()
        shares = t[merging] / t[merging].sum(1, keepdim=True)
        wanted = shares @ norms
        # ||P F|| row by row from the Gram matrix: P G P^T's diagonal, without touching the wide features
        rows = producer[merging]
        got = ((rows @ g) * rows).sum(1).clamp_min(0).sqrt() / rows.sum(1).abs().clamp_min(1e-12)
        ratio = torch.where(got > 1e-12, wanted / got.clamp_min(1e-12), torch.ones_like(got))
        producer = producer.clone()
        producer[merging] = rows * ratio[:, None]
    return {"producer": producer, "consumer": _as(consumer_merge)}


def _feature_parts(slices: Sequence[ChannelSlice], folds: Sequence[BatchNormFold], roles: Sequence[Role]) -> Iterator[Tensor]:
    """The ``(n, d_s)`` blocks of the channels' feature vectors, one weight tensor at a time: producer output
    rows (BN-folded where a BatchNorm follows) and/or consumer input columns, as ``roles`` asks
    (producer-only falls back to both when no producer has weights)."""
    if not any(s.is_feature and s.role in roles for s in slices):
        roles = ("producer", "consumer")
    if not any(s.is_feature and s.role in roles for s in slices):
        raise ValueError("dependency group has no weight tensor to describe its channels")
    folded = {id(f.weight): f for f in folds}
    for s in slices:
        if s.is_feature and s.role in roles:
            fold = folded.get(id(s))
            yield fold.folded_weight() if fold is not None else s.rows()


def channel_features(slices: Sequence[ChannelSlice], folds: Sequence[BatchNormFold] = (),
                     roles: Sequence[Role] = ("producer", "consumer")) -> Tensor:
    """Concatenated feature vector of every group channel (see :func:`_feature_parts`). Returns ``(n, d)``,
    at least single precision. As wide as all the group's weights together: where only similarities
    are needed, :func:`channel_gram` gets them without building it."""
    return torch.cat(list(_feature_parts(slices, folds, roles)), dim=1)


def channel_gram(slices: Sequence[ChannelSlice], folds: Sequence[BatchNormFold] = (),
                 roles: Sequence[Role] = ("producer", "consumer"), columns: Optional[Tensor] = None) -> Tensor:
    """``F F^T`` of :func:`channel_features` (single precision), or only its ``columns`` (``F F[columns]^T``,
    ``n x len(columns)``), summed one weight tensor at a time, so that the features of a wide group (a
    language model's hidden width: nearly all of its weights) are never concatenated."""
    total: Optional[Tensor] = None
    for part in _feature_parts(slices, folds, roles):
        f = part.float()
        share = f @ (f if columns is None else f.index_select(0, columns.to(f.device))).T
        total = share if total is None else total + share
    return total


def channel_square_norms(slices: Sequence[ChannelSlice], folds: Sequence[BatchNormFold] = (),
                         roles: Sequence[Role] = ("producer", "consumer")) -> Tensor:
    """The diagonal of :func:`channel_gram`: every channel's squared feature norm, ``(n,)``."""
    return sum(part.float().pow(2).sum(1) for part in _feature_parts(slices, folds, roles))


def fuse_group(slices: Sequence[ChannelSlice], folds: Sequence[BatchNormFold], mats: Dict[Role, Tensor],
               kept: Tensor, correlation: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """New values for every tensor of a group, given the producer and consumer merge matrices of
    :func:`merge_matrices` (same shapes as now; the kept channels hold the merged values, the others
    are left for the pruner to remove). ``correlation`` (n x n, see :func:`channel_correlation`) is
    the channel correlation assumed for BatchNorm statistics; by default each BN's producer rows give
    it. Nothing is modified in place."""
    out: Dict[str, Tensor] = {}
    in_fold = {id(s) for f in folds for s in f.slices()}
    for fold in folds:
        out.update(_fuse_batchnorm_fold(fold, mats["producer"], kept, correlation))
    for s in slices:
        if id(s) in in_fold:
            continue
        # A tensor can hold the group's channels along two dims (a layer feeding its own input
        # stream): chain the updates, the row and column merges commute.
        current = out.get(s.key, s.tensor.detach())
        rows = s.rows(current)
        merged = mats[s.role].to(device=current.device, dtype=rows.dtype) @ rows
        out[s.key] = s.write(merged, kept, base=current)
    return out


def gram(features: Tensor) -> Tensor:
    """``F F^T`` of channel features (n x d), in single precision: channel similarities for the
    statistics estimates, computed once per group."""
    f = features.float()
    return f @ f.T


def channel_correlation(gram_matrix: Tensor) -> Tensor:
    """Cosine similarity of the channels whose Gram matrix is given (zero-norm channels: 0)."""
    norms = gram_matrix.diagonal().clamp_min(0).sqrt()
    scale = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))
    return (gram_matrix * scale[:, None] * scale[None, :]).clamp(-1.0, 1.0)


def output_variance_ratios(slices: Sequence[ChannelSlice], producer_gram: Tensor, producer_merge: Tensor,
                           kept: Tensor, fused: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """For every consumer weight of the group: by how much the variance of each of its outputs
    changes when the group's channels are replaced by the fused ones, ``(out,)`` per key.

    Data-free estimate: channels have unit variance and correlate as the cosine similarity of their
    producer rows (``producer_gram`` is their Gram matrix, see :func:`gram`; merged channels: of their
    merged rows); a consumer's other inputs are uncorrelated. A BatchNorm after the consumer can then keep normalising its input
    (plain and fused pruning otherwise shrink the variance layer after layer). Exactly 1 where only
    duplicates were merged.
    """
    merge = producer_merge.to(device=producer_gram.device, dtype=producer_gram.dtype)
    corr_before = channel_correlation(producer_gram)
    corr_after = channel_correlation(merge @ producer_gram @ merge.T)  # Gram of the merged rows
    ratios: Dict[str, Tensor] = {}
    for s in slices:
        if s.role != "consumer" or not s.is_feature or s.dim != 1 or s.key not in fused:
            continue
        before = s.per_output()
        after = s.per_output(fused[s.key])[:, kept.to(before.device)]
        rest = s.tensor.detach().float().flatten(1).pow(2).sum(1) - before.pow(2).sum((1, 2))
        var_before = _quadratic_form(before, corr_before) + rest
        var_after = _quadratic_form(after, corr_after) + rest
        ratios[s.key] = torch.where(var_before > 1e-12, var_after / var_before.clamp_min(1e-12), torch.ones_like(var_before))
    return ratios


def _quadratic_form(blocks: Tensor, corr: Tensor) -> Tensor:
    """``sum_m x_om^T C x_om`` for every output ``o`` of ``blocks`` ``(out, n, m)``."""
    out, n, m = blocks.shape
    x = blocks.permute(0, 2, 1).reshape(-1, n)
    return ((x @ corr.to(x)) * x).sum(1).reshape(out, m).sum(1)


def _fuse_batchnorm_fold(fold: BatchNormFold, merge: Tensor, kept: Tensor,
                         correlation: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Merge a producer+BN pair in folded space and re-parameterise it.

    With ``u_i`` the standardised output of channel ``i`` and ``a`` one row of ``merge``, the
    merged channel must compute ``sum_i a_i (gamma_i u_i + beta_i)`` in eval mode. The producer is
    given the folded rows ``sum_i a_i W_i gamma_i / s_i`` and a zero bias, and the BN
    ``mean' = -sum_i a_i gamma_i (b_i - mean_i) / s_i`` (which is also the true mean of its new input),
    ``var'`` an estimate of its new input's variance, ``weight' = sqrt(var' + eps)``,
    ``beta' = sum_i a_i beta_i``. Rows that merge nothing are left exactly as they were.
    """
    device = fold.weight.tensor.device
    merge = merge.to(device)
    k = len(kept)
    own = merge[torch.arange(k, device=device), kept.to(device)]
    identity_rows = (own == 1.0) & (merge.abs().sum(1) == 1.0)

    raw = fold.weight.rows()
    merge = merge.to(raw.dtype)
    scale = fold.scale()
    w_f = raw * scale[:, None]
    b_f = fold.folded_bias()
    beta = fold.bn_bias.rows().mean(1)
    gamma = fold.bn_weight.rows().mean(1)

    new_w = merge @ w_f
    new_mean = -(merge @ b_f)
    new_beta = merge @ beta
    # Variance of sum_i a_i gamma_i u_i, taking the correlation of u_i and u_j as the cosine
    # similarity of their producer rows (exact for duplicates; recalibration refines it).
    corr = (channel_correlation(gram(raw)) if correlation is None else correlation).to(raw)
    ag = merge * gamma[None, :]
    new_var = ((ag @ corr) * ag).sum(1).clamp_min(1e-12)
    new_gamma = torch.sqrt(new_var + fold.eps)

    old = {
        "w": raw[kept],
        "mean": fold.running_mean.rows()[kept],
        "var": fold.running_var.rows()[kept],
        "gamma": fold.bn_weight.rows()[kept],
        "beta": fold.bn_bias.rows()[kept],
    }
    keep_old = identity_rows[:, None]

    def per_channel(values: Tensor, template: Tensor) -> Tensor:
        return values[:, None].expand_as(template)

    out = {
        fold.weight.key: fold.weight.write(torch.where(keep_old, old["w"], new_w), kept),
        fold.running_mean.key: fold.running_mean.write(
            torch.where(keep_old, old["mean"], per_channel(new_mean, old["mean"])), kept),
        fold.running_var.key: fold.running_var.write(
            torch.where(keep_old, old["var"], per_channel(new_var, old["var"])), kept),
        fold.bn_weight.key: fold.bn_weight.write(
            torch.where(keep_old, old["gamma"], per_channel(new_gamma, old["gamma"])), kept),
        fold.bn_bias.key: fold.bn_bias.write(
            torch.where(keep_old, old["beta"], per_channel(new_beta, old["beta"])), kept),
    }
    if fold.bias is not None:
        old_b = fold.bias.rows()[kept]
        out[fold.bias.key] = fold.bias.write(torch.where(keep_old, old_b, torch.zeros_like(old_b)), kept)
    return out
