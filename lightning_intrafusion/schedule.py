"""Sparsity schedules: event index -> cumulative sparsity (relative to the original widths).

Pure functions of ``(event, num_events)``; no torch, no Lightning. ``event`` counts from 0 and the
last event (``num_events - 1``) always reaches the target.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Union

ScheduleFn = Callable[[int, int], float]


class SparsitySchedule:
    """Base class: ``schedule(event, num_events) -> sparsity``, checked to lie in ``[0, 1)``."""

    def __init__(self, target: float) -> None:
        if not isinstance(target, (int, float)) or not 0.0 <= float(target) < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target!r}")
        self.target = float(target)

    def __call__(self, event: int, num_events: int) -> float:
        if num_events < 1 or not 0 <= event < num_events:
            raise ValueError(f"event {event} is outside 0..{num_events - 1}")
        return min(self.target, max(0.0, self.sparsity(event, num_events)))

    def sparsity(self, event: int, num_events: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target})"


class ConstantSchedule(SparsitySchedule):
    """The target at every event (one shot, then nothing more to remove)."""

    def sparsity(self, event: int, num_events: int) -> float:
        return self.target


class LinearSchedule(SparsitySchedule):
    """Equal steps: ``target * (event + 1) / num_events``."""

    def sparsity(self, event: int, num_events: int) -> float:
        return self.target * (event + 1) / num_events


class CubicSchedule(SparsitySchedule):
    """Automated gradual pruning (Zhu & Gupta, 2017): ``s = target * (1 - (1 - t)^3)`` with
    ``t = (event + 1) / num_events``: large steps first, small ones near the end."""

    def sparsity(self, event: int, num_events: int) -> float:
        t = (event + 1) / num_events
        return self.target * (1.0 - (1.0 - t) ** 3)


class ExponentialSchedule(SparsitySchedule):
    """The kept fraction shrinks geometrically: ``1 - (1 - target)^t`` (equal relative steps)."""

    def sparsity(self, event: int, num_events: int) -> float:
        t = (event + 1) / num_events
        return 1.0 - (1.0 - self.target) ** t


class ExplicitSchedule(SparsitySchedule):
    """``{event: sparsity}``; events not listed keep the last listed sparsity."""

    def __init__(self, points: Mapping[int, float]) -> None:
        if not points:
            raise ValueError("an explicit schedule needs at least one {event: sparsity} entry")
        self.points: Dict[int, float] = {int(k): float(v) for k, v in points.items()}
        for v in self.points.values():
            if not 0.0 <= v < 1.0:
                raise ValueError(f"explicit schedule sparsities must be in [0, 1), got {v}")
        super().__init__(max(self.points.values()))

    def sparsity(self, event: int, num_events: int) -> float:
        past = [k for k in self.points if k <= event]
        return self.points[max(past)] if past else 0.0


SCHEDULES = {"constant": ConstantSchedule, "linear": LinearSchedule, "cubic": CubicSchedule,
             "exponential": ExponentialSchedule}


def resolve_schedule(schedule: Union[str, SparsitySchedule, Mapping[int, float], ScheduleFn], target: float) -> ScheduleFn:
    """A schedule from a name (``constant``, ``linear``, ``cubic``, ``exponential``), a mapping
    (explicit), a :class:`SparsitySchedule`, or any callable ``(event, num_events) -> sparsity``."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {schedule!r}; expected one of {sorted(SCHEDULES)}, a mapping or a callable")
        return SCHEDULES[schedule](target)
    if isinstance(schedule, Mapping):
        return ExplicitSchedule(schedule)
    if callable(schedule):
        return schedule
    raise TypeError(f"schedule must be a name, a mapping or a callable, got {type(schedule).__name__}")


def check_monotone(schedule: ScheduleFn, num_events: int) -> list:
    """The sparsities of all events; raises if one is outside [0, 1) or decreases."""
    values = [float(schedule(i, num_events)) for i in range(num_events)]
    for i, v in enumerate(values):
        if not 0.0 <= v < 1.0 or math.isnan(v):
            raise ValueError(f"schedule gives sparsity {v} at event {i}; it must be in [0, 1)")
    for i in range(1, num_events):
        if values[i] < values[i - 1] - 1e-12:
            raise ValueError(f"schedule decreases at event {i} ({values[i - 1]} -> {values[i]}): pruned channels cannot come back")
    return values
