"""Running a module on inputs of any form, leaving its train/eval modes as they were."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn


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
