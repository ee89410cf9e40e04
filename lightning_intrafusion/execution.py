"""Running a module on inputs of any form, leaving its train/eval modes as they were."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

try:  # torch.compile's wrapper; its ``_orig_mod`` is the user's module, parameters shared
    from torch._dynamo.eval_frame import OptimizedModule
except ImportError:  # pragma: no cover - torch without dynamo
    OptimizedModule = ()


def uncompiled(model: nn.Module) -> nn.Module:
    """The module that ``torch.compile`` wrapped (the same object the wrapper runs), or ``model``.
    Pruning works on it eagerly; the compiled wrapper recompiles for the new shapes on its next call."""
    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


@contextmanager
def eager(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every ``torch.compile``-d submodule of ``model`` is replaced in its parent by the module it
    wraps (the same object, parameters shared), so that tracing sees its layers, forward hooks fire and
    module names are those of the uncompiled model; the compiled wrappers are put back on exit and
    recompile for new shapes on their next call. Yields ``model`` itself uncompiled."""
    swapped = []
    for parent in uncompiled(model).modules():
        for name, child in list(parent._modules.items()):
            if isinstance(child, OptimizedModule):
                swapped.append((parent, name, child))
                parent._modules[name] = uncompiled(child)
    try:
        if swapped:  # a wrapper inside a replaced one: replace that too
            with eager(model) as inner:
                yield inner
        else:
            yield uncompiled(model)
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)`` for a tensor, ``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Whatever happens inside (``model.eval()``, a library that switches modes, an error), every
    submodule's train/eval mode is restored on exit."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def eval_forward(model: nn.Module, inputs: Any, hooks: Sequence[Any] = ()) -> Any:
    """One forward pass in eval mode without gradients; the hooks behind the ``hooks`` handles (there to
    observe it) are removed and every module's mode is restored afterwards, whatever happens."""
    try:
        with preserved_modes(model), torch.no_grad():
            return call_model(model.eval(), inputs)
    finally:
        for handle in hooks:
            handle.remove()
