"""Checking that a pruned model still computes what it did, shape for shape: the outputs, and every
attention computation but its head count. A forward that reshapes with a width the dependency graph does
not show (a head count kept in an attribute, a reshape to a fixed width) either fails outright or, worse,
runs and silently regroups tokens into heads; both are caught here, so the step can be rolled back.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Tuple

from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_intrafusion.execution import eval_forward


ROLLED_BACK = ("The step was rolled back; leave those layers out with exclude=[...] or include=[...], or pass "
               "on_unsupported='skip' to find and leave out the groups concerned")


class ForwardBrokenError(RuntimeError):
    """The pruned model no longer runs on the example inputs, attends differently or returns outputs of other
    shapes (the step is rolled back): ``problem`` says what went wrong, ``reason`` is the forward's own error
    (or the shapes that changed), ``advice`` what to do."""

    def __init__(self, problem: str, reason: str, advice: str = ROLLED_BACK) -> None:
        super().__init__(f"{problem}. {advice}")
        self.problem, self.reason = problem, reason


class Signature(NamedTuple):
    """What pruning must not change about a forward pass: the output shapes, and the shape of every
    attention computation but its head count (see :class:`_AttentionCalls`)."""

    outputs: List[Tuple[int, ...]]
    attention: List[Tuple[Any, ...]]


class _AttentionCalls(TorchFunctionMode):
    """Records every ``scaled_dot_product_attention`` call as (batch dims, query tokens, key tokens, head
    size), and every matrix product of two activations of 4 or more dims (attention written out:
    ``q @ k.transpose(-2, -1)``, ``weights @ v``) as both operands' shapes without the head dim (-3)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: List[Tuple[Any, ...]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key = (list(args) + [kwargs.get("query"), kwargs.get("key")][len(args):])[:2]
            if isinstance(query, Tensor) and isinstance(key, Tensor) and query.dim() >= 3:
                self.shapes.append(("attention", tuple(query.shape[:-3]), int(query.shape[-2]), int(key.shape[-2]),
                                    int(query.shape[-1])))
        elif getattr(func, "__name__", "") in ("matmul", "__matmul__") and len(args) == 2 and all(
                isinstance(a, Tensor) and not isinstance(a, nn.Parameter) and a.dim() >= 4 for a in args):
            a, b = args
            self.shapes.append(("product", tuple(a.shape[:-3]) + tuple(a.shape[-2:]), tuple(b.shape[-2:])))
        return func(*args, **kwargs)


def forward_signature(model: nn.Module, example_inputs: Any) -> Signature:
    calls = _AttentionCalls()
    try:
        with calls:
            out = eval_forward(model, example_inputs)
    except Exception as err:
        raise ValueError(f"the model could not be run on example_inputs ({type(err).__name__}: {err})") from err
    return Signature([tuple(t.shape) for t in _tensors(out)], calls.shapes)


def check_still_runs(model: nn.Module, example_inputs: Any, before: Signature) -> None:
    try:
        after = forward_signature(model, example_inputs)
    except ValueError as err:
        raise ForwardBrokenError(
            f"the pruned model no longer runs ({err.__cause__}); its forward depends on a layer width that "
            f"the dependency graph does not show (e.g. a reshape to a fixed number of heads)",
            reason=f"{type(err.__cause__).__name__}: {err.__cause__}",
        ) from err
    # pruning never changes how many calls there are, except where a layer is swapped for one that calls
    # the function itself (nn.MultiheadAttention's fused path -> PrunableMultiheadAttention): compare call by call
    same_calls = len(after.attention) == len(before.attention)
    changed = next(((b, a) for b, a in zip(before.attention, after.attention) if a != b), None) if same_calls else None
    if changed is not None:
        detail = f"an attention computation had the shape (all but the head count) {changed[0]} before and {changed[1]} after"
        raise ForwardBrokenError(
            f"the pruned model still runs but attends differently ({detail}): its forward reshapes the "
            f"projections with a head count or head size that pruning did not update (an attribute of the "
            f"layer the dependency graph does not show), which would regroup tokens silently",
            reason=f"attention regrouped: {detail}",
        )
    if after.outputs != before.outputs:
        detail = f"the model's output shapes change from {before.outputs} to {after.outputs}"
        raise ForwardBrokenError(
            f"the pruned model still runs but {detail}: some pruned channels reach an output without passing "
            f"a layer (e.g. a residual stream returned as last_hidden_state), which the dependency graph does not show",
            reason=detail,
        )


def _tensors(obj: Any) -> List[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    if hasattr(obj, "to_tuple"):  # Hugging Face ModelOutput
        return _tensors(obj.to_tuple())
    return []
