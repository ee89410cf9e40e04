"""Neurons of gated MLPs whose gate and up projections are packed in one layer (Phi-3's ``gate_up_proj``).

Such an MLP computes ``gate, up = gate_up_proj(x).chunk(2, -1)`` and ``down_proj(up * act(gate))``:
neuron ``i`` owns outputs ``i`` and ``I + i`` of ``gate_up_proj`` (``I`` neurons) and input ``i`` of
``down_proj``. The dependency graph cannot follow the chunk (it sees ``down_proj`` read half of the
packed outputs), so these MLPs are recognised by their attributes, and the layout is confirmed on the
module itself before any neuron is touched: removing a neuron's two packed rows must change the
output exactly as removing its ``down_proj`` column does (an interleaved packing would not).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn
from torch.func import functional_call

from lightning_intrafusion.execution import preserved_modes


def is_packed_gated_mlp(module: nn.Module) -> bool:
    """An ``nn.Linear`` ``gate_up_proj`` with twice as many outputs as the ``nn.Linear`` ``down_proj`` has
    inputs, packed as ``[gate | up]`` (or ``[up | gate]``), as the module's own forward confirms."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Linear) and isinstance(down, nn.Linear)):
        return False
    if gate_up.out_features != 2 * down.in_features or gate_up.in_features != down.out_features:
        return False
    return _halves_are_neurons(module)


def positions(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``(neurons, c)`` positions of every neuron in ``gate_up_proj``'s outputs (its gate and up rows)
    and in ``down_proj``'s inputs."""
    neurons = torch.arange(module.down_proj.in_features)
    return {"gate_up_proj": torch.stack([neurons, neurons + len(neurons)], dim=1), "down_proj": neurons[:, None]}


@torch.no_grad()
def _halves_are_neurons(module: nn.Module) -> bool:
    """Whether silencing rows ``i`` and ``I + i`` of ``gate_up_proj`` (every even ``i``) gives the same
    output as zeroing those columns of ``down_proj``, on random inputs (``up * act(gate)`` is zero once
    both are zero, for any activation). False if the module does not run on one tensor."""
    gate_up, down = module.gate_up_proj, module.down_proj
    weight = gate_up.weight
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, gate_up.in_features, generator=generator).to(device=weight.device, dtype=weight.dtype)
    silenced = positions(module)["gate_up_proj"][::2].reshape(-1).to(weight.device)
    params = {"gate_up_proj.weight": weight.index_fill(0, silenced, 0)}
    if gate_up.bias is not None:
        params["gate_up_proj.bias"] = gate_up.bias.index_fill(0, silenced, 0)
    columns = torch.arange(0, down.in_features, 2, device=weight.device)
    try:
        with preserved_modes(module):  # eval mode: no dropout between the three runs
            module.eval()
            by_rows = functional_call(module, params, (x,))
            by_columns = functional_call(module, {"down_proj.weight": down.weight.index_fill(1, columns, 0)}, (x,))
            reference = module(x)
    except Exception:  # a forward with other arguments: not the pattern this module knows
        return False
    if not (isinstance(by_rows, torch.Tensor) and isinstance(by_columns, torch.Tensor)) or by_rows.shape != by_columns.shape:
        return False
    tolerance = 1e-3 * float(reference.abs().max()) + 1e-6
    changed = float((reference - by_columns).abs().max()) > tolerance  # silencing neurons must matter at all
    return changed and float((by_rows - by_columns).abs().max()) <= tolerance
