"""What one cycle did, for the CLI, `--watch` and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CycleReport:
    """The figures of one committed cycle (`rpo_seconds`: commit time - base point's time)."""

    vm: str
    cycle_id: int
    point_id: int
    kind: str
    consistency: str
    resumed: bool
    bytes_planned: int
    bytes_read: int
    bytes_written: int
    bytes_zeroed: int
    seconds: float
    rpo_seconds: float | None
    notes: list[str] = field(default_factory=list)
