"""Neurons of gated MLPs whose gate and up projections are packed in one layer (Phi-3's ``gate_up_proj``,
ModernBERT's ``Wi``).

Such an MLP computes ``gate, up = gate_up_proj(x).chunk(2, -1)`` and ``down_proj(up * act(gate))``:
neuron ``i`` owns outputs ``i`` and ``I + i`` of ``gate_up_proj`` (``I`` neurons) and input ``i`` of
``down_proj``. The dependency graph cannot follow the chunk (it sees ``down_proj`` read half of the
packed outputs), so these MLPs are recognised by their attributes (:data:`LAYER_NAMES`), and the layout
is confirmed on the module itself before any neuron is touched: removing a neuron's two packed rows must
change the output exactly as removing its ``down_proj`` column does (an interleaved packing would not).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn
from torch.func import functional_call

from lightning_intrafusion.execution import preserved_modes


# (packed gate and up projection, down projection) attribute names of the MLPs recognised
LAYER_NAMES: Tuple[Tuple[str, str], ...] = (("gate_up_proj", "down_proj"), ("Wi", "Wo"))


def is_packed_gated_mlp(module: nn.Module, names: Tuple[str, str] = LAYER_NAMES[0]) -> bool:
    """An ``nn.Linear`` packed projection (``names[0]``, e.g. ``gate_up_proj``) with twice as many outputs as
    the ``nn.Linear`` down projection (``names[1]``) has inputs, packed as ``[gate | up]`` (or ``[up | gate]``),
    as the module's own forward confirms."""
    gate_up, down = (getattr(module, name, None) for name in names)
    if not (isinstance(gate_up, nn.Linear) and isinstance(down, nn.Linear)):
        return False
    if gate_up.out_features != 2 * down.in_features or gate_up.in_features != down.out_features:
        return False
    return _halves_are_neurons(module, names)


def positions(module: nn.Module, names: Tuple[str, str] = LAYER_NAMES[0]) -> Dict[str, torch.Tensor]:
    """``(neurons, c)`` positions of every neuron in the packed projection's outputs (its gate and up rows;
    key ``names[0]``) and in the down projection's inputs (key ``names[1]``)."""
    neurons = torch.arange(getattr(module, names[1]).in_features)
    return {names[0]: torch.stack([neurons, neurons + len(neurons)], dim=1), names[1]: neurons[:, None]}


@torch.no_grad()
def _halves_are_neurons(module: nn.Module, names: Tuple[str, str]) -> bool:
    """Whether silencing rows ``i`` and ``I + i`` of the packed projection (every even ``i``) gives the same
    output as zeroing those columns of the down projection, on random inputs (``up * act(gate)`` is zero
    once both are zero, for any activation). False if the module does not run on one tensor."""
    packed, down_name = names
    gate_up, down = getattr(module, packed), getattr(module, down_name)
    weight = gate_up.weight
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, gate_up.in_features, generator=generator).to(device=weight.device, dtype=weight.dtype)
    silenced = positions(module, names)[packed][::2].reshape(-1).to(weight.device)
    params = {f"{packed}.weight": weight.index_fill(0, silenced, 0)}
    if gate_up.bias is not None:
        params[f"{packed}.bias"] = gate_up.bias.index_fill(0, silenced, 0)
    columns = torch.arange(0, down.in_features, 2, device=weight.device)
    try:
        with preserved_modes(module):  # eval mode: no dropout between the three runs
            module.eval()
            by_rows = functional_call(module, params, (x,))
            by_columns = functional_call(module, {f"{down_name}.weight": down.weight.index_fill(1, columns, 0)}, (x,))
            reference = module(x)
    except Exception:  # a forward with other arguments: not the pattern this module knows
        return False
    if not (isinstance(by_rows, torch.Tensor) and isinstance(by_columns, torch.Tensor)) or by_rows.shape != by_columns.shape:
        return False
    tolerance = 1e-3 * float(reference.abs().max()) + 1e-6
    changed = float((reference - by_columns).abs().max()) > tolerance  # silencing neurons must matter at all
    return changed and float((by_rows - by_columns).abs().max()) <= tolerance
