"""Provider-neutral data shapes shared by sources, targets and the engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Firmware(StrEnum):
    """Boot firmware of a VM."""

    BIOS = "bios"
    UEFI = "uefi"


class Consistency(StrEnum):
    """How consistent a recovery point is."""

    CRASH = "crash"
    APP = "app"


@dataclass(frozen=True)
class Extent:
    """A byte range of a disk."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class DiskSpec:
    """One disk of a VM as the source sees it.

    `name` is the disk's stable key inside the VM (libvirt target dev, vSphere device key...).
    `change_tracking` is False when the source cannot report changed extents for this disk
    (the engine then falls back to hash-compare against the last point's manifest).
    """

    name: str
    size: int
    format: str = "raw"
    change_tracking: bool = True
    boot: bool = False


@dataclass(frozen=True)
class NicSpec:
    """One network interface of a VM."""

    name: str
    mac: str
    network: str = ""
    model: str = "virtio"


@dataclass(frozen=True)
class VMSpec:
    """Inventory of one VM: what a target needs to know to protect and recreate it.

    `extra` carries platform-specific hints as strings (e.g. direct-kernel boot paths) that a
    target of the same platform may honour and others ignore.
    """

    id: str
    name: str
    cpus: int
    memory_mib: int
    firmware: Firmware = Firmware.BIOS
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    guest_os: str = "unknown"
    power_state: str = "unknown"
    extra: dict[str, str] = field(default_factory=dict)

    def disk(self, name: str) -> DiskSpec:
        for d in self.disks:
            if d.name == name:
                return d
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VMSpec:
        return cls(
            id=data["id"],
            name=data["name"],
            cpus=int(data["cpus"]),
            memory_mib=int(data["memory_mib"]),
            firmware=Firmware(data.get("firmware", "bios")),
            disks=tuple(DiskSpec(**d) for d in data.get("disks", ())),
            nics=tuple(NicSpec(**n) for n in data.get("nics", ())),
            guest_os=data.get("guest_os", "unknown"),
            power_state=data.get("power_state", "unknown"),
            extra=dict(data.get("extra", {})),
        )


@dataclass(frozen=True)
class Validation:
    """What a target says about a VM: every problem that prevents protection, and its choices."""

    problems: list[str] = field(default_factory=list)
    size: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class ProtectionInfo:
    """What a target needs to know about a protection."""

    id: int
    vm: VMSpec
    source_site: str
    target_site: str


@dataclass(frozen=True)
class PointInfo:
    """A recovery point as handed to a target: its id, time, and the target's own reference."""

    id: int
    created_at: datetime
    ref: dict[str, Any]
    disks: dict[str, int]  # disk name -> size in bytes at that point


@dataclass(frozen=True)
class FailoverResult:
    """What a failover created: the target's reference (to clean up) and a human summary."""

    ref: dict[str, Any]
    vm_name: str
    summary: str


@dataclass(frozen=True)
class Usage:
    """What one protection holds at its target, as the engine recorded it (for cost estimates).

    `replica_bytes`: allocated (non-zero) bytes of the latest point; `point_bytes`: bytes
    written by the cycles of every retained point after the oldest (what snapshots keep apart
    from the replica); `size`: the VM size chosen for failover.
    """

    protection: ProtectionInfo
    replica_bytes: int
    point_bytes: int
    points: int
    size: str | None


@dataclass(frozen=True)
class CostLine:
    """One priced item of an estimate."""

    protection: str
    item: str
    quantity: float
    unit: str
    unit_price: float
    monthly: float
    hourly: float = 0.0


@dataclass(frozen=True)
class CostEstimate:
    """A cost estimate: lines, totals, currency and where the prices came from."""

    lines: list[CostLine]
    currency: str
    prices_from: str
    notes: list[str] = field(default_factory=list)

    @property
    def monthly(self) -> float:
        return sum(line.monthly for line in self.lines)

    @property
    def hourly(self) -> float:
        return sum(line.hourly for line in self.lines)


def size_text(n: int | None) -> str:
    """Bytes for people: `1.5 GiB`."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)
