"""What one pruning step did."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List


@dataclass
class GroupReport:
    """One dependency group: its root layer, widths before/after and how its channels were merged."""

    name: str
    width_before: int
    width_after: int
    merged: int = 0  # removed channels whose mass went (at least partly) into a kept channel
    members: List[str] = field(default_factory=list)


UNSUPPORTED = "unsupported: "  # prefix of the reason a skipped group could not be pruned exactly


@dataclass
class PruneReport:
    """The outcome of :func:`lightning_intrafusion.prune`."""

    method: str
    sparsity: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    seconds: float
    groups: List[GroupReport] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    calibration: str = ""  # where the re-estimated BN statistics came from: "data", "synthetic" or "" (none)
    removals: List[Any] = field(default_factory=list)  # [module, side, indices]: replayable record

    @property
    def calibrated(self) -> bool:
        """Whether BatchNorm statistics were re-estimated after pruning (on data or synthetic inputs)."""
        return bool(self.calibration)

    @property
    def channels_before(self) -> int:
        return sum(g.width_before for g in self.groups)

    @property
    def channels_after(self) -> int:
        return sum(g.width_after for g in self.groups)

    @property
    def achieved_sparsity(self) -> float:
        """Fraction of the pruned groups' channels that were removed."""
        before = self.channels_before
        return 0.0 if before == 0 else 1.0 - self.channels_after / before

    @property
    def param_reduction(self) -> float:
        return 0.0 if self.params_before == 0 else 1.0 - self.params_after / self.params_before

    @property
    def mac_reduction(self) -> float:
        return 0.0 if self.macs_before == 0 else 1.0 - self.macs_after / self.macs_before

    def widths(self) -> Dict[str, int]:
        return {g.name: g.width_after for g in self.groups}

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out.update(calibrated=self.calibrated, achieved_sparsity=self.achieved_sparsity, param_reduction=self.param_reduction,
                   mac_reduction=self.mac_reduction)
        return out

    @property
    def unsupported(self) -> Dict[str, str]:
        """Groups left unpruned because they cannot be pruned exactly (``on_unsupported="skip"``)."""
        return {name: why for name, why in self.skipped.items() if why.startswith(UNSUPPORTED)}

    def __str__(self) -> str:
        left = f", {len(self.unsupported)} unsupported groups left unpruned" if self.unsupported else ""
        return (
            f"{self.method}: sparsity {self.achieved_sparsity:.1%} over {len(self.groups)} groups, "
            f"params {self.params_before:,} -> {self.params_after:,} (-{self.param_reduction:.1%}), "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} (-{self.mac_reduction:.1%}), "
            f"{self.seconds:.3f}s{left}"
        )
