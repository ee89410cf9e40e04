"""Layer-wise reconstruction with calibration data: after a pruning step, every pruned linear layer and
convolution is refit, in the order the forward pass calls them, to reproduce what the unpruned layer computed
(its kept outputs) from the inputs it now actually receives (least squares over the layer's input features,
im2col patches for a convolution, with a ridge toward the weights the step left). Each layer thereby also
corrects what the layers before it lost, which per-layer compensation from the unpruned model's statistics
cannot (:mod:`~lightning_intrafusion.compensation`).

The unpruned layers' outputs on the calibration batches are recorded before the step and kept in memory as
rows (one per sample and token or pixel), at most :data:`MAX_ROWS` evenly spaced rows per layer and batch and at
most :data:`MAX_STORED` values in all (fewer rows per batch for more or wider layers); the refit uses the same
rows of the inputs and takes one pass over the batches per layer (per group of layers reading the same input
tensor), each stopped at that layer. A layer's refit is kept only if, fitted on every other batch, it predicts the remaining ones better than the step's weights.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_intrafusion.compensation import output_inverse
from lightning_intrafusion.execution import call_model, preserved_modes
from lightning_intrafusion.surgery import transposed_linear_types

RIDGE = 1e-3  # relative to the mean diagonal of the features' Gram matrix, as linear compensation
MAX_FEATURES = 8192  # widest input (channels x kernel size) refit; wider layers keep what the step gave them
MAX_ROWS = 4096  # rows (samples x positions) of a layer's output kept per batch
MAX_STORED = 2 ** 27  # values kept in all (512 MiB in single precision)
MIN_ROWS = 64  # per layer and batch, whatever the budget


def refittable(module: nn.Module) -> bool:
    """A linear layer (also Hugging Face's ``Conv1D``), or a 2-D convolution with one group and zero padding."""
    if isinstance(module, (nn.Linear,) + transposed_linear_types()):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


def _transposed(layer: nn.Module) -> bool:
    return isinstance(layer, transposed_linear_types())  # weight stored (in, out): x @ W


def _features(layer: nn.Module) -> int:
    return layer.weight.shape[0] if _transposed(layer) else layer.weight[0].numel()


def _observed(model: nn.Module, name: str) -> Tuple[nn.Module, bool]:
    """The module whose call shows the named layer at work, and whether it is the ``nn.MultiheadAttention`` that
    applies it as its output projection without calling it (then its output is the projection's)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if leaf == "out_proj" and isinstance(parent, nn.MultiheadAttention):
        return parent, True
    return model.get_submodule(name), False


def _attention_output(output: Any) -> Optional[Tensor]:
    return output[0] if isinstance(output, tuple) else output if isinstance(output, Tensor) else None


def _outputs(layer: nn.Module) -> int:
    return layer.weight.shape[1] if _transposed(layer) else layer.weight.shape[0]


def row_limit(layers: Sequence[nn.Module], batches: int) -> int:
    """Rows kept per layer and batch so that all of them fit :data:`MAX_STORED` (at most :data:`MAX_ROWS`)."""
    widths = sum(_outputs(layer) for layer in layers) * max(1, batches)
    return max(MIN_ROWS, min(MAX_ROWS, MAX_STORED // max(1, widths)))


def rows_kept(total: int, limit: int) -> Optional[Tensor]:
    """Evenly spaced indices of ``limit`` of ``total`` rows, or None for all of them."""
    if total <= limit:
        return None
    return torch.linspace(0, total - 1, limit).round().long()


@torch.no_grad()
def record_outputs(model: nn.Module, batches: Sequence[Any], names: Sequence[str],
                   limit: Optional[int] = None) -> Dict[str, List[Tensor]]:
    """The outputs of the named layers on every batch (the first call per batch) as rows (``(rows, out)``,
    single precision; at most ``limit`` evenly spaced rows per batch, default :func:`row_limit`), in the order
    the forward pass first calls them (the dict's order). The model runs in eval mode; modes are restored."""
    outputs: Dict[str, List[Tensor]] = {}
    if limit is None:
        limit = row_limit([model.get_submodule(name) for name in names], len(batches))

    def hook(name: str, layer: nn.Module, attention: bool):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            output = _attention_output(output) if attention else output
            if isinstance(output, Tensor) and len(outputs.setdefault(name, [])) == current[0]:
                rows = _rows(layer, output.detach())
                picked = rows_kept(len(rows), limit)
                outputs[name].append((rows if picked is None else rows[picked.to(rows.device)]).float())
        return record

    current = [0]
    hooks = []
    for name in names:
        observed, attention = _observed(model, name)
        hooks.append(observed.register_forward_hook(hook(name, model.get_submodule(name), attention)))
    try:
        with preserved_modes(model):
            model.eval()
            for current[0], batch in enumerate(batches):
                call_model(model, batch)
    finally:
        for handle in hooks:
            handle.remove()
    return outputs


@torch.no_grad()
def refit_layers(model: nn.Module, batches: Sequence[Any], targets: Dict[str, List[Tensor]],
                 kept_outputs: Dict[str, Tensor], ridge: float = RIDGE) -> List[str]:
    """Refit the layers of ``targets`` (unpruned output rows per batch from :func:`record_outputs`, in call
    order) one after the other, each from its inputs in ``model`` as it is by then to the unpruned outputs at
    ``kept_outputs[name]`` (all outputs where absent). Layers that read the very same input tensor (a block's
    query, key and value projections; a gated MLP's gate and up projections) are refit from one pass, since
    refitting one cannot change what the others receive. Returns the names refit (layers that never ran, are
    too wide or whose refit did not hold on held-out batches are left). The model runs in eval mode; modes are
    restored."""
    done: List[str] = []
    with preserved_modes(model):
        model.eval()
        pending = [name for name, wanted in targets.items()
                   if _eligible(model.get_submodule(name), wanted, kept_outputs.get(name), len(batches))]
        while pending:
            moments = _shared_input_moments(model, pending, batches, targets, kept_outputs)
            for name, pair in moments.items():
                if _fit(model.get_submodule(name), name, pair, ridge):
                    done.append(name)
            pending = [name for name in pending[1:] if name not in moments]
    return done


def _eligible(layer: nn.Module, wanted: Sequence[Tensor], kept: Optional[Tensor], batches: int) -> bool:
    if not refittable(layer) or _features(layer) > MAX_FEATURES or len(wanted) != batches:
        return False
    # outputs removed in a way the removals do not say per layer (packed attention heads) are left
    return (wanted[0].shape[1] if kept is None else len(kept)) == _outputs(layer)


def _moment_values(layer: nn.Module) -> int:
    """Values of a layer's even- and odd-batch moments (Gram and cross matrices)."""
    features = _features(layer) + (layer.bias is not None)
    return 2 * features * (features + _outputs(layer))


def _shared_input_moments(model: nn.Module, pending: Sequence[str], batches: Sequence[Any],
                          targets: Dict[str, List[Tensor]], kept_outputs: Dict[str, Tensor]) -> Dict[str, List["_Moments"]]:
    """Even- and odd-batch moments of the first pending layer and of the pending layers after it that read the
    same input tensor, unmodified (at most :data:`MAX_STORED` moment values together), from one pass over the
    batches stopped once they have run (in call order; empty if the first layer never ran)."""
    first = pending[0]
    layer = model.get_submodule(first)
    observed, attention = _observed(model, first)
    if attention:  # nn.MultiheadAttention's output projection: its input is solved from the module's output
        return _projection_moments(model, layer, first, observed, batches, targets[first], kept_outputs.get(first))
    capture = _SharedInputCapture(first, _moment_values(layer))
    moments: Dict[str, List[_Moments]] = {}
    handles = [model.get_submodule(name).register_forward_pre_hook(capture.hook(name)) for name in pending
               if not _observed(model, name)[1]]
    try:
        for index, batch in enumerate(batches):
            capture.start_batch()
            _call_until_captured(model, batch)
            if first not in capture.inputs:
                return {}
            if any(name not in capture.inputs for name in capture.members):  # the group differs between batches
                capture.members[1:] = []  # keep the first layer alone; the others wait for a later pass
                moments = {first: moments[first]} if first in moments else {}
            for name in capture.members:
                pair = moments.setdefault(name, [_Moments(), _Moments()])
                _add_batch(pair[index % 2], model.get_submodule(name), capture.inputs[name], targets[name][index],
                           kept_outputs.get(name))
            capture.exploring = False
    finally:
        for handle in handles:
            handle.remove()
    return {name: moments[name] for name in capture.members}


class _SharedInputCapture:
    """Forward pre-hooks that capture, in one pass, the input of the first pending layer and of the layers called
    after it with that very tensor, unmodified (its version counter unchanged), and stop the pass at the first
    other one. On the first batch (``exploring``) they decide the group (``members``, within a budget of moment
    values); on later batches they capture its members only and stop after the last."""

    def __init__(self, first: str, first_values: int) -> None:
        self.first = first
        self.members = [first]
        self.budget = MAX_STORED - first_values
        self.exploring = True
        self.inputs: Dict[str, Tensor] = {}
        self.shared: Optional[Tensor] = None
        self.version = 0

    def start_batch(self) -> None:
        self.inputs.clear()
        self.shared = None

    def hook(self, name: str):
        def capture(module: nn.Module, args: Any) -> None:
            x = args[0]
            if name in self.inputs:
                raise _Captured  # a layer called again (a shared module): its first call is the one refit
            if name == self.first:
                self.shared, self.version = x, x._version
            elif self.shared is None:
                return  # called before the first pending layer: nothing of this pass depends on it
            elif x is not self.shared or x._version != self.version:
                raise _Captured  # its input may depend on a layer of the group: left for a later pass
            elif self.exploring:
                if self.budget < _moment_values(module):
                    raise _Captured
                self.budget -= _moment_values(module)
                self.members.append(name)
            elif name not in self.members:
                raise _Captured
            self.inputs[name] = x.detach()
            if not self.exploring and name == self.members[-1]:
                raise _Captured  # the rest of the forward pass is not needed
        return capture


def _projection_moments(model: nn.Module, layer: nn.Module, name: str, observed: nn.Module, batches: Sequence[Any],
                        wanted: Sequence[Tensor], kept: Optional[Tensor]) -> Dict[str, List["_Moments"]]:
    """The moments of nn.MultiheadAttention's output projection, whose input is solved from the module's output."""
    inverse = output_inverse(layer)
    if inverse is None:
        return {}
    inputs: List[Tensor] = []

    def capture_projected(module: nn.Module, args: Any, output: Any) -> None:
        # the projection's input, solved from the attention's output: x = W^+ (y - b)
        y = _attention_output(output).detach().double()
        if layer.bias is not None:
            y = y - layer.bias.detach().double()
        inputs.append(y @ inverse.T)
        raise _Captured  # the rest of the forward pass is not needed

    moments = [_Moments(), _Moments()]
    handle = observed.register_forward_hook(capture_projected)
    try:
        for index, batch in enumerate(batches):
            inputs.clear()
            _call_until_captured(model, batch)
            if not inputs:
                return {}
            _add_batch(moments[index % 2], layer, inputs[0], wanted[index], kept)
    finally:
        handle.remove()
    return {name: moments}


def _add_batch(moments: "_Moments", layer: nn.Module, inputs: Tensor, target: Tensor, kept: Optional[Tensor]) -> None:
    """Add one batch's input features (the rows kept of the target's) and kept target outputs to ``moments``."""
    x = _input_features(layer, inputs)
    picked = rows_kept(len(x), len(target)) if len(x) != len(target) else None
    if picked is not None:
        x = x[picked.to(x.device)]
    if layer.bias is not None:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
    y = target if kept is None else target[:, kept.to(target.device)]
    moments.add(x, y.to(x))


def _fit(layer: nn.Module, name: str, moments: Sequence["_Moments"], ridge: float) -> bool:
    """Refit one layer from its even- and odd-batch moments; kept only if, fitted on the even batches, it predicts
    the odd ones better than the weights the step left (a refit that only fits its own samples would make the
    model worse)."""
    weight = layer.weight.detach()
    prior = (weight if _transposed(layer) else weight.reshape(weight.shape[0], -1).T).to(moments[0].gram)
    if layer.bias is not None:
        prior = torch.cat([prior, layer.bias.detach().to(prior)[None, :]], 0)
    n = _features(layer)
    if moments[1].count:  # held-out check: fit on the even batches, compare on the odd ones
        trial = _solve(moments[0], prior, n, ridge)
        if moments[1].error(trial) >= moments[1].error(prior):
            return False
        solution = _solve(moments[0] + moments[1], prior, n, ridge)
    else:
        solution = _solve(moments[0], prior, n, ridge)
    if not torch.isfinite(solution).all():
        raise ValueError(f"refitting layer {name!r} on calibration_data gave non-finite weights")
    fitted = solution[:n] if _transposed(layer) else solution[:n].T.reshape(layer.weight.shape)
    layer.weight.data = fitted.to(layer.weight)
    if layer.bias is not None:
        layer.bias.data = solution[n].to(layer.bias)
    return True


class _Moments:
    """``X^T X``, ``X^T Y`` and ``sum |Y|^2`` of rows of features ``X`` and targets ``Y``."""

    def __init__(self) -> None:
        self.gram: Any = 0.0
        self.cross: Any = 0.0
        self.squares = 0.0
        self.count = 0

    def add(self, x: Tensor, y: Tensor) -> None:
        self.gram = self.gram + x.T @ x
        self.cross = self.cross + x.T @ y
        self.squares += float(y.pow(2).sum())
        self.count += len(x)

    def __add__(self, other: "_Moments") -> "_Moments":
        total = _Moments()
        total.gram, total.cross = self.gram + other.gram, self.cross + other.cross
        total.squares, total.count = self.squares + other.squares, self.count + other.count
        return total

    def error(self, w: Tensor) -> float:
        """``sum |Y - X w|^2`` from the moments."""
        return self.squares - 2 * float((w * self.cross).sum()) + float((w * (self.gram @ w)).sum())


def _solve(moments: _Moments, prior: Tensor, n: int, ridge: float) -> Tensor:
    """Least squares with a ridge (``ridge`` x the mean diagonal over the ``n`` features; none on a bias
    column) toward ``prior``: directions the calibration inputs do not explore keep the step's weights."""
    gram = moments.gram
    regulariser = torch.zeros_like(gram)
    regulariser.diagonal()[:n] = ridge * gram.diagonal()[:n].mean().clamp_min(torch.finfo(gram.dtype).tiny)
    return torch.linalg.solve(gram + regulariser, moments.cross + regulariser @ prior)  # (features [+ 1], outputs)


class _Captured(Exception):
    """Stops a forward pass once the refit layer's input is captured (eval mode: nothing is left half-updated)."""


def _call_until_captured(model: nn.Module, batch: Any) -> None:
    """Run the model on a batch until a hook raises :class:`_Captured` (or to the end)."""
    try:
        call_model(model, batch)
    except _Captured:
        pass


def _input_features(layer: nn.Module, x: Tensor) -> Tensor:
    if isinstance(layer, nn.Conv2d):
        patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
    return x.reshape(-1, x.shape[-1]).double()


def _rows(layer: nn.Module, y: Tensor) -> Tensor:
    """A layer's output as rows of its output channels, in the order of :func:`_input_features`'s rows."""
    return y.movedim(1, -1).reshape(-1, y.shape[1]) if isinstance(layer, nn.Conv2d) else y.reshape(-1, y.shape[-1])
