"""What one cycle did, for the CLI, `--watch` and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field

from standby.core.model import size_text


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
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds per phase: begin, snapshot, open_writer, plan, copy, verify, seal, visible."""

    def summary(self) -> str:
        """One line for people: point, kind, bytes and rate."""
        rate = self.bytes_read / self.seconds / (1 << 20) if self.seconds else 0.0
        resumed = ", resumed" if self.resumed else ""
        return (
            f"{self.vm}: point {self.point_id} ({self.kind}, {self.consistency}{resumed}) read "
            f"{size_text(self.bytes_read)}, wrote {size_text(self.bytes_written)}, zeroed "
            f"{size_text(self.bytes_zeroed)} in {self.seconds:.1f}s ({rate:.0f} MiB/s)"
        )
