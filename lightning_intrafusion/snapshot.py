"""All-or-nothing model surgery: remember a module tree's tensors and attributes, and put them back if a
pruning step fails half way.

Pruning and fusion never write into existing tensors or objects: they rebind ``Parameter.data``, replace
parameters and buffers, and give a layer a copy of a config before changing it. Remembering references is
therefore enough; nothing is copied.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from torch import nn


class ModelSnapshot:
    """References to every parameter (with its data and grad), buffer, child module and public attribute (a
    head count, a config) of every submodule, taken at construction; :meth:`restore` makes the module tree as
    it was."""

    def __init__(self, model: nn.Module) -> None:
        self._entries: List[Tuple[nn.Module, Dict[str, Any]]] = []
        for module in model.modules():
            params = dict(module._parameters)
            self._entries.append((module, {
                "params": params,
                "data": {k: (p.data, p.grad, p.requires_grad) for k, p in params.items() if p is not None},
                "buffers": dict(module._buffers),
                "modules": dict(module._modules),
                "attrs": {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"},
                "training": module.training,
            }))

    def restore(self) -> None:
        for module, state in self._entries:
            module._parameters.clear()
            module._parameters.update(state["params"])
            for name, (data, grad, requires_grad) in state["data"].items():
                param = state["params"][name]
                param.data = data
                param.grad = grad
                param.requires_grad_(requires_grad)
            module._buffers.clear()
            module._buffers.update(state["buffers"])
            module._modules.clear()
            module._modules.update(state["modules"])
            for name, value in state["attrs"].items():
                setattr(module, name, value)
            module.training = state["training"]
