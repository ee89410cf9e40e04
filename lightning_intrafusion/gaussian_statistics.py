"""Data-free input statistics: the inputs a layer gets when every normalisation layer outputs what it is
built to output.

A normalisation layer (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm) outputs its own affine map of
standardised values. Drawing those standardised values as independent standard normals (BatchNorm: each
channel's input drawn from its running mean and variance; the others: standard normal inputs, which they
standardise themselves) models the inputs of every layer behind a norm without any data: the assumption of
data-free quantisation's bias correction (Nagel et al., ICCV 2019), there made for BatchNorm, here for any
norm. The moments of a layer's inputs over a few such forward passes stand in for measured ones in
:func:`~lightning_intrafusion.compensation.lost_linear_compensation`.

No value of the example inputs is read: floating-point inputs are replaced by noise in every pass, and a
layer whose inputs depend on the inputs' values (no norm before it, or token ids reaching it other than
through a norm) gets no statistics: two passes with the same norm outputs and different inputs (noise
redrawn; in integer tensors such as token ids, each value replaced by the next larger value the tensor holds,
except in tensors of at most two values, such as masks) must give it identical input moments.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from lightning_intrafusion.calibration import ChannelMoments, observe_batches
from lightning_intrafusion.compensation import InputStatistics, consumer_input_statistics, layer_input_hooks, output_inverse
from lightning_intrafusion.snapshot import ModelSnapshot

SAMPLES = 4096  # input rows (tokens, pixels) per layer to aim for
MAX_PASSES = 64  # forward passes at most
# ridge of the least squares on modelled moments (relative, as compensation.RIDGE for measured ones): the model
# is only a model, so predictions shrink toward the mean repair. Exploratory runs without data (README): 0.1
# above 1e-3 on the digits transformers in all 6 cells (by 0.1-0.4 points; 0.3 and 1 no better overall) and
# within 0.02 bits per byte on the language models (at or below it in 5 of 6 cells).
RIDGE = 0.1
SECOND_MOMENT_BUDGET = 2 ** 27  # values of E[x x^T] kept at once in a data-free step (1 GiB in double precision)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's, or a class named ``*RMSNorm`` / ``*LayerNorm`` (Hugging Face's LLaMA,
    Gemma, T5 ...), which standardise their input and apply their own affine map."""
    rms = getattr(nn, "RMSNorm", None)
    return (isinstance(module, _NORMS) or (rms is not None and isinstance(module, rms))
            or type(module).__name__.endswith(("RMSNorm", "LayerNorm")))


@torch.no_grad()
def gaussian_input_statistics(model: nn.Module, example_inputs: Any, keys: Collection[str],
                              second_moments: Collection[str] = (), samples: int = SAMPLES,
                              max_passes: int = MAX_PASSES, seed: int = 0) -> Dict[str, InputStatistics]:
    """Input statistics of the layers keyed in ``keys`` (weight keys, as for
    :func:`~lightning_intrafusion.compensation.consumer_input_statistics`, with ``E[x x^T]`` for those in
    ``second_moments``) under standard normal norm outputs, over enough passes on ``example_inputs``' shapes for
    ``samples`` input rows per layer (at most ``max_passes``). Layers whose inputs depend on the example inputs'
    values are left out. Deterministic for a given ``seed``; the model's parameters and modes are left as they
    were. A model whose forward rejects the modelled inputs (e.g. one that counts end-of-sequence tokens among
    the ids) gets no statistics, with a warning."""
    keys = set(keys)
    if not keys:
        return {}
    return _on_modelled_norms(model, seed, {}, lambda drawn, noise: _modelled_statistics(
        model, example_inputs, keys, second_moments, samples, max_passes, seed, drawn, noise))


def _on_modelled_norms(model: nn.Module, seed: int, nothing: Any, run: Callable[[torch.Generator, torch.Generator], Any]) -> Any:
    """``run(drawn, noise)`` with every norm of ``model`` outputting what it draws from ``drawn`` (``noise``: for the
    inputs), hooks removed afterwards; ``nothing`` for a model without norms, or, with a warning, one whose forward
    rejects the modelled inputs (e.g. one that counts end-of-sequence tokens among the ids)."""
    norms = [module for module in model.modules() if is_norm(module)]
    if not norms:
        return nothing
    drawn, noise = torch.Generator(), torch.Generator().manual_seed(seed)  # norm outputs, input noise
    hooks = [norm.register_forward_hook(_standard_output(drawn)) for norm in norms]
    try:
        return run(drawn, noise)
    except Exception as error:  # the model checks its inputs: nothing to model, the step goes on without it
        # (stacklevel: the caller of prune(), through gaussian_input_statistics or modelled_layers (each with its
        # no_grad wrapper), _Step.consumer_statistics or modelled_consumers, and _Step.run)
        warnings.warn(f"no data-free compensation (OTConfig.gaussian_compensation): the model rejected modelled "
                      f"inputs ({type(error).__name__}: {error})", stacklevel=7)
        return nothing
    finally:
        for handle in hooks:
            handle.remove()


def _modelled_statistics(model: nn.Module, example_inputs: Any, keys: Collection[str], second_moments: Collection[str],
                         samples: int, max_passes: int, seed: int, drawn: torch.Generator,
                         noise: torch.Generator) -> Dict[str, InputStatistics]:
    """The passes of :func:`gaussian_input_statistics` (its norms' hooks draw from ``drawn``)."""
    independent, passes = _independent_layers(model, example_inputs, keys, samples, max_passes, seed, drawn, noise)
    if not independent:
        return {}
    drawn.manual_seed(seed + 1)
    batches = (_noised(example_inputs, noise, shift=False) for _ in range(passes))
    measured = consumer_input_statistics(model, batches, keys=independent, second_moments=set(second_moments) & independent,
                                         product_dtype=torch.float32)
    return {key: replace(stats, ridge=RIDGE) for key, stats in measured.items()}


def _independent_layers(model: nn.Module, example_inputs: Any, keys: Collection[str], samples: int, max_passes: int,
                        seed: int, drawn: torch.Generator, noise: torch.Generator) -> Tuple[Set[str], int]:
    """The keyed layers whose input moments are the same for two passes with the same norm outputs and other
    inputs, and how many passes give them ``samples`` rows each (at most ``max_passes``)."""
    drawn.manual_seed(seed)
    first = consumer_input_statistics(model, [_noised(example_inputs, noise, shift=False)], keys=keys)
    drawn.manual_seed(seed)  # the same norm outputs, other inputs
    second = consumer_input_statistics(model, [_noised(example_inputs, noise, shift=True)], keys=keys)
    independent = {key for key, stats in first.items() if key in second and _same(stats.mean, second[key].mean)}
    if not independent:
        return set(), 0
    rows = min(first[key].samples for key in independent)
    return independent, max(1, min(max_passes, math.ceil(samples / max(rows, 1))))


@torch.no_grad()
def modelled_layers(model: nn.Module, example_inputs: Any, keys: Collection[str], samples: int = SAMPLES,
                    max_passes: int = MAX_PASSES, seed: int = 0) -> Set[str]:
    """Those of the keyed layers whose inputs the Gaussian model describes: they depend on norm outputs only,
    not on the example inputs' values (the check of :func:`gaussian_input_statistics`); a model rejecting the
    modelled inputs has none, with a warning."""
    if not keys:
        return set()
    return _on_modelled_norms(model, seed, set(), lambda drawn, noise: _independent_layers(
        model, example_inputs, set(keys), samples, max_passes, seed, drawn, noise)[0])


@torch.no_grad()
def gaussian_joint_statistics(model: nn.Module, before: ModelSnapshot, example_inputs: Any, keys: Collection[str],
                              second_moments: Collection[str] = (), samples: int = SAMPLES,
                              max_passes: int = MAX_PASSES, seed: int = 0) -> Dict[str, InputStatistics]:
    """Joint input statistics of the keyed layers (linear layers, Hugging Face ``Conv1D``, ungrouped
    convolutions, ``nn.MultiheadAttention``'s output projection) as the model computed them in the state
    ``before`` (a snapshot of it) and as it computes them now, under standard normal norm outputs: pass by
    pass the two states see the same norm outputs and inputs, and each layer's ``m`` inputs then and ``m``
    inputs now are moments of one ``2m``-channel stream (``E[z z^T]`` for the layers in ``second_moments``).
    For :func:`~lightning_intrafusion.compensation.merged_linear_compensation` after a fusion; only for layers
    :func:`modelled_layers` found. The model is left in its current state and modes."""
    keys = set(keys)
    norms = [module for module in model.modules() if is_norm(module)]
    if not keys or not norms:
        return {}
    now = ModelSnapshot(model)
    drawn, noise = torch.Generator(), torch.Generator().manual_seed(seed)
    moments: Dict[str, ChannelMoments] = {}
    passes, number = 1, 0
    try:
        while number < passes:
            inputs = _noised(example_inputs, noise, shift=False)
            seen = []
            for state in (before, now):
                state.restore()
                drawn.manual_seed(seed + 1 + number)
                seen.append(_layer_inputs(model, inputs, keys, norms, drawn))
            found = keys & set(seen[0]) & set(seen[1])
            if number == 0 and found:  # enough passes for ``samples`` rows per layer
                rows = min(len(seen[1][key]) for key in found)
                passes = max(1, min(max_passes, math.ceil(samples / max(1, rows))))
            for key in found:
                joint = torch.cat([seen[0][key], seen[1][key]], 1)
                moments.setdefault(key, ChannelMoments(1, key in second_moments, torch.float32)).add(joint)
            number += 1
    finally:
        now.restore()
    stats = {}
    for key, m in moments.items():
        mean, second = m.mean(), m.second_moment() if m.cross else None
        if torch.isfinite(mean).all() and (second is None or torch.isfinite(second).all()):
            stats[key] = InputStatistics(mean, second, _has_bias(model, key), m.count, RIDGE)
    return stats


def _has_bias(model: nn.Module, key: str) -> bool:
    return getattr(model.get_submodule(key[: -len(".weight")]) if key != "weight" else model, "bias", None) is not None


def _layer_inputs(model: nn.Module, inputs: Any, keys: Collection[str], norms: List[nn.Module],
                  drawn: torch.Generator) -> Dict[str, Tensor]:
    """One pass of ``model`` on ``inputs`` with modelled norm outputs: the keyed layers' inputs as ``(rows, m)``
    (the first call of each layer; ``nn.MultiheadAttention``'s output projection solved from the module's
    output, where its weight has full column rank)."""
    seen: Dict[str, Tensor] = {}

    def keep(key: str, x: Any, channel_dim: int) -> None:
        if key not in seen and isinstance(x, Tensor) and x.dim() > 0:
            seen[key] = x.detach().movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim]).double()

    def on_input(key: str, layer: nn.Module, x: Any, dim: int) -> None:
        if getattr(layer, "groups", 1) == 1:
            keep(key, x, dim)

    def on_attention_output(key: str, module: nn.MultiheadAttention, output: Any) -> None:
        inverse = output_inverse(module.out_proj) if key not in seen and isinstance(output, Tensor) else None
        if inverse is not None:
            keep(key, _solved(output, inverse, module.out_proj.bias), -1)

    hooks = [norm.register_forward_hook(_standard_output(drawn)) for norm in norms]
    hooks += layer_input_hooks(model, lambda key, layer: key in keys, on_input, on_attention_output)
    observe_batches(model, [inputs], None, "example_inputs", hooks)
    return seen


def _solved(output: Tensor, inverse: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The input ``x`` of a projection ``y = W x + b`` from its output, with ``inverse`` = ``W^+``."""
    y = output.detach().double()
    if bias is not None:
        y = y - bias.detach().double()
    return y @ inverse.T.to(y.device)


def within_budget(widths: Mapping[str, int], budget: Optional[int] = None) -> Set[str]:
    """The layers (keyed, with their input widths ``m``) whose ``m x m`` second moments fit in ``budget`` values
    (default :data:`SECOND_MOMENT_BUDGET`) together, narrowest first: a data-free step is a default one, so its
    memory is bounded; the widest layers get the mean repair only."""
    budget = SECOND_MOMENT_BUDGET if budget is None else budget
    kept: Set[str] = set()
    for key in sorted(widths, key=lambda k: (widths[k], k)):
        if widths[key] ** 2 <= budget:
            budget -= widths[key] ** 2
            kept.add(key)
    return kept


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal up to the rounding of kernels that need not be bitwise reproducible (some GPU reductions)."""
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max().clamp_min(1e-12))))


def _standard_output(generator: torch.Generator):
    """A forward hook replacing a norm's output by the norm applied to inputs it standardises into standard
    normal values (drawn from ``generator``, on the CPU so that every device draws the same). A norm called
    with anything but its one input (a gate, keywords) is left as it is."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            return None
        x = args[0]
        z = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        running_mean, running_var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and running_mean is not None and running_var is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            z = running_mean.reshape(shape) + (running_var.reshape(shape) + module.eps).sqrt() * z
        return module.forward(z)  # forward() itself: no hook fires again

    return hook


def _noised(inputs: Any, generator: torch.Generator, shift: bool) -> Any:
    """``inputs`` with every floating-point tensor replaced by standard normal noise of its shape and, with
    ``shift``, every value of an integer tensor holding more than two values replaced by the next larger one it
    holds (the largest by the smallest): other token ids, still valid ones; masks are left as they are."""
    if isinstance(inputs, Tensor):
        if inputs.is_floating_point():
            return torch.randn(inputs.shape, generator=generator, dtype=torch.float32).to(inputs.device, inputs.dtype)
        values = torch.unique(inputs) if shift and not inputs.is_complex() else None
        if values is None or len(values) <= 2:
            return inputs
        return values[(torch.searchsorted(values, inputs) + 1) % len(values)]
    if isinstance(inputs, dict):
        return {key: _noised(value, generator, shift) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_noised(value, generator, shift) for value in inputs)
    return inputs


__all__: List[str] = ["RIDGE", "SECOND_MOMENT_BUDGET", "gaussian_input_statistics", "gaussian_joint_statistics", "is_norm",
                      "modelled_layers", "within_budget"]
