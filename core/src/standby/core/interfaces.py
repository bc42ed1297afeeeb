"""The contracts every plugin implements: `Source` and `Target`.

All vendor SDKs block, so these interfaces are synchronous; the engine owns the threads.
Capabilities are class-level flags, checked before connecting. A plugin translates its SDK's
exceptions into the `standby.core.errors` tree at its edge (`raise ... from`).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from standby.core.config import Site
from standby.core.errors import CapabilityNotSupported, NotFound
from standby.core.extents import Intervals
from standby.core.model import (
    Consistency,
    CostEstimate,
    Extent,
    FailoverResult,
    PointInfo,
    ProtectionInfo,
    Usage,
    Validation,
    VMSpec,
)

Buffer = bytes | bytearray | memoryview
"""What writers accept: the engine hands out slices of its read buffers without copying."""


@dataclass(frozen=True)
class SourceCapabilities:
    """What a source can do, known without connecting."""

    change_tracking: bool = False
    app_consistent: bool = False
    power_ops: bool = False
    max_parallel_reads: int = 4
    tokens_released: bool = True
    """`release_tokens` drops the older tokens (they stop being valid); False where tokens
    are the platform's own and stay valid until it resets them (vSphere changeIds)."""


@dataclass(frozen=True)
class TargetCapabilities:
    """What a target can do, known without connecting."""

    test_failover: bool = False
    max_disks: int = 64
    max_disk_size: int = 1 << 50
    alignment: int = 512
    max_write: int = 4 << 20
    max_parallel_writes: int = 4
    write_proof: str = ""
    """How the target proves each write without reading it back, in words for the point's
    notes ("checked by the service (Content-MD5)"); empty when it cannot. With it, policy
    `verify = "auto"` reads back only what `ReplicaWriter.unproven` names plus a sample,
    instead of everything the cycle wrote."""


@dataclass
class Snapshot:
    """A point-in-time view of all disks of a VM at the source.

    `since` is the change token each disk's extents are relative to (None: full read).
    `tokens` are the change tokens this snapshot establishes, stored once the point commits.
    `handle` is the plugin's own state.
    """

    vm: VMSpec
    consistency: Consistency
    taken_at: datetime
    since: dict[str, str | None]
    tokens: dict[str, str | None]
    handle: Any = None
    notes: list[str] = field(default_factory=list)


class Plugin(ABC):
    """What sources and targets share: a site, a connection and a readiness check."""

    plugin_name: ClassVar[str] = ""

    def __init__(self, site: Site) -> None:
        self.site = site

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this plugin cannot work on this machine (a library missing...), or None."""
        return None

    @abstractmethod
    def connect(self) -> None:
        """Open the platform connection; raise AuthError/TransientError/PluginError."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection; safe to call twice."""

    def check(self) -> list[str]:
        """Connect and report facts about the site (for `standby sites check`)."""
        self.connect()
        return [f"connected to {self.site.name}"]

    def __enter__(self) -> Plugin:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Source(Plugin):
    """Where VMs run today. Must be safe for concurrent `read` calls from engine threads."""

    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities()

    @abstractmethod
    def list_vms(self) -> list[VMSpec]:
        """Inventory of the site's VMs."""

    def get_vm(self, key: str) -> VMSpec:
        """One VM by id or name; NotFound when it does not exist."""
        for vm in self.list_vms():
            if key in (vm.id, vm.name):
                return vm
        raise NotFound(f"VM '{key}' not found at site '{self.site.name}'")

    @abstractmethod
    def open_snapshot(
        self, vm: VMSpec, consistency: Consistency, since: Mapping[str, str | None]
    ) -> AbstractContextManager[Snapshot]:
        """Freeze a point-in-time view of every disk of `vm`.

        `since` maps disk name -> the change token of the last good point (or None for a full
        read). If the source cannot honour a token (expired, unknown), it sets that disk's
        `Snapshot.since` entry to None and the engine does a full read with hash-compare.
        When app consistency is asked for but cannot be had, the snapshot says CRASH and
        adds a note. Leaving the context releases everything the snapshot holds.
        """

    @abstractmethod
    def changed_extents(self, snapshot: Snapshot, disk: str) -> Iterator[Extent]:
        """Extents changed since `snapshot.since[disk]`; all allocated extents when None.

        Extents are in offset order and may be reported at any granularity.
        """

    @abstractmethod
    def read(self, snapshot: Snapshot, disk: str, extent: Extent) -> Buffer:
        """Bytes of one extent as of the snapshot (bytes, or a bytearray/memoryview the engine
        may keep: no copy needed). Called from several threads at once."""

    def read_many(self, snapshot: Snapshot, disk: str, extents: list[Extent]) -> list[Buffer]:
        """The bytes of several extents of one disk, in order (the engine hands over up to 32
        scattered blocks of an incremental cycle at once, at most 4 MiB in all). Override it
        when the platform can have the reads in flight together; the default reads in turn."""
        return [self.read(snapshot, disk, e) for e in extents]

    def token_valid(self, vm: VMSpec, token: str) -> bool:
        """Whether a change token can still serve as `since`."""
        return False

    def release_tokens(self, vm: VMSpec, keep: Mapping[str, str | None]) -> None:
        """Drop source-side change-tracking state other than `keep` (stale checkpoints)."""

    def power_off(self, vm: VMSpec, force: bool = False) -> None:
        """Ask the guest to shut down (`force`: power off at once); returns without waiting."""
        raise CapabilityNotSupported(f"plugin '{self.plugin_name}' cannot power VMs off")

    def power_on(self, vm: VMSpec) -> None:
        raise CapabilityNotSupported(f"plugin '{self.plugin_name}' cannot power VMs on")


class ReplicaWriter(ABC):
    """One cycle's write session into a protection's replica disks at the target.

    Writes land in a pending state that no recovery point exposes; `commit_point` turns them
    into an immutable point. A session reopened with the same cycle id continues the same
    pending state (that is how an interrupted cycle resumes). Safe for concurrent writes.
    """

    checkpoint_seconds: ClassVar[float] = 0.0
    """The least time between the engine's checkpoints (each one a `flush`) for a target
    whose flush is costly (sealing a snapshot); the engine's own interval when smaller."""

    @abstractmethod
    def write(self, disk: str, offset: int, data: Buffer) -> None:
        """Write bytes at offset (aligned to the target's alignment)."""

    def write_many(self, disk: str, pieces: list[tuple[int, Buffer]]) -> None:
        """Several writes of one disk, (offset, data) in any order; done when it returns.
        Override it when the platform can have them in flight together."""
        for offset, data in pieces:
            self.write(disk, offset, data)

    @abstractmethod
    def write_zeroes(self, disk: str, extent: Extent) -> None:
        """Make an extent read as zeroes (trim where possible)."""

    @abstractmethod
    def read(self, disk: str, extent: Extent) -> Buffer:
        """Read back pending bytes (used to verify before commit); any bytes-like object."""

    @abstractmethod
    def flush(self) -> None:
        """Make every write so far durable; progress is checkpointed only after this."""

    def unproven(self, disk: str, written: Intervals, planned: Intervals) -> Intervals:
        """The ranges the engine must read back to verify this cycle of `disk`.

        Called after the last flush, only on targets with `write_proof`. `written` are the
        ranges this session wrote, `planned` every range the cycle may have touched. Return
        the parts of `written` the target cannot prove it holds as sent, and any range it
        holds outside `planned` (a misplaced write). The default proves nothing."""
        return written

    def notes(self) -> list[str]:
        """What the operator should read in the cycle's report about this session (retried
        throttling, a slow service), asked for once the point is sealed."""
        return []

    @abstractmethod
    def commit_point(self, point_id: int, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Seal the pending state as recovery point `point_id`; idempotent. Returns its ref.

        `meta` is the engine's record of the point (source time, consistency, per-disk size and
        manifest digest); a target that keeps metadata beside its replicas stores it.
        """


@dataclass(frozen=True)
class NativePoint:
    """A recovery point the platform's own replication holds at the DR site."""

    ref: dict[str, Any]
    """The target's reference; its failover, cleanup and commit act on it."""
    taken_at: datetime
    consistency: Consistency = Consistency.CRASH


@dataclass(frozen=True)
class NativeState:
    """What the platform says of one VM's replication."""

    state: str
    healthy: bool
    reason: str = ""
    points: list[NativePoint] = field(default_factory=list)
    """The recovery points at the DR site now, oldest first (the platform keeps its own
    history: points it no longer lists are gone)."""


class NativeReplication(ABC):
    """A platform's own replication that standby orchestrates instead of copying (Hyper-V
    Replica): the platform moves the bytes; standby turns it on, records the recovery points
    it reports as the protection's points, and fails over through the target's usual
    `failover` / `cleanup_test` / `commit_failover` (their refs say which mode made them).
    `source` is the protection's source plugin (the primary side)."""

    @abstractmethod
    def enable(self, protection: ProtectionInfo, source: Source, retain: int, rpo: int) -> None:
        """Start replicating the VM (and its initial copy); undo what it did if it fails."""

    @abstractmethod
    def sync(self, protection: ProtectionInfo, source: Source, final: bool) -> NativeState:
        """The replication's state and points. `final` (a planned failover, the source VM
        off): first ship what is left, so the newest point holds everything."""

    @abstractmethod
    def reverse(self, protection: ProtectionInfo, source: Source) -> None:
        """Re-protect: replicate the other way (`protection` is the new direction)."""

    @abstractmethod
    def disable(self, protection: ProtectionInfo, source: Source) -> None:
        """Stop replicating (unprotect); the VMs stay."""


class Target(Plugin):
    """The DR site: keeps replica disks and recovery points, and fails VMs over."""

    capabilities: ClassVar[TargetCapabilities] = TargetCapabilities()

    @property
    def on_step(self) -> Callable[[str], None] | None:
        """Set by the engine: where this thread's `step` reports go (one per failover)."""
        local = self.__dict__.get("_step_local")
        return getattr(local, "callback", None) if local is not None else None

    @on_step.setter
    def on_step(self, callback: Callable[[str], None] | None) -> None:
        local = self.__dict__.setdefault("_step_local", threading.local())
        local.callback = callback

    def step(self, message: str) -> None:
        """Report one step of a long operation (failover, cleanup)."""
        callback = self.on_step
        if callback is not None:
            callback(message)

    @abstractmethod
    def validate(self, vm: VMSpec) -> Validation:
        """Every reason `vm` cannot be protected here, and the size chosen for failover."""

    @abstractmethod
    def prepare(self, protection: ProtectionInfo) -> None:
        """Create what the protection needs at the target (idempotent)."""

    @abstractmethod
    def open_writer(
        self, protection: ProtectionInfo, cycle_id: int, base: PointInfo | None
    ) -> AbstractContextManager[ReplicaWriter]:
        """Open (or reopen) the pending state of cycle `cycle_id` on top of point `base`.

        Disk sizes come from `protection.vm`; a disk larger than at `base` is grown.
        """

    @abstractmethod
    def discard_pending(self, protection: ProtectionInfo, cycle_id: int) -> None:
        """Drop what an abandoned cycle wrote (idempotent)."""

    @abstractmethod
    def prune(
        self, protection: ProtectionInfo, drop: list[PointInfo], keep: list[PointInfo]
    ) -> dict[int, dict[str, Any]]:
        """Delete points `drop`; returns new refs for kept points whose storage moved."""

    @abstractmethod
    def failover(
        self,
        protection: ProtectionInfo,
        point: PointInfo,
        *,
        test: bool,
        network: str | None = None,
        size: str | None = None,
        failover_id: int | None = None,
    ) -> FailoverResult:
        """Start a VM from `point`; a test failover goes to an isolated network.

        `size` is the size chosen at validation; `failover_id` is the engine's record of this
        failover: a target tags what it creates with it so that `cleanup_test({"failover_id":
        id})` finds everything even when the failover died part-way. A target that fails
        part-way removes what it created before raising, or leaves it findable that way.
        """

    @abstractmethod
    def cleanup_test(self, protection: ProtectionInfo, ref: Mapping[str, Any]) -> None:
        """Remove everything a test failover created (idempotent)."""

    @abstractmethod
    def remove(self, protection: ProtectionInfo, points: list[PointInfo]) -> None:
        """Remove every replica and point of a protection (unprotect)."""

    def commit_failover(
        self,
        protection: ProtectionInfo,
        ref: Mapping[str, Any],
        point: PointInfo,
        released: list[PointInfo],
    ) -> None:
        """A real failover from `point` is final: free what no longer serves (the points
        `released`, replication helpers); what the failed-over VM runs on stays."""
        self.prune(protection, released, [point])

    def seed(self, protection: ProtectionInfo, original: VMSpec) -> dict[str, Any] | None:
        """For re-protect towards this site: a point ref over the VM's original disks here
        (shut down; the new replica is layered on them), or None to copy everything.

        The ref may say `"exact": False` when the data it seeds with is not the failed-over
        point's (e.g. an older replica): the engine then reads it back block by block."""
        return None

    def native(self, kind: str) -> NativeReplication | None:
        """The platform replication `kind` (a policy's `replication`) this target can
        orchestrate with the given source, or None."""
        return None

    def estimate_cost(self, usage: list[Usage]) -> CostEstimate:
        """Monthly storage and hourly compute cost of the given protections at this site."""
        raise CapabilityNotSupported(f"plugin '{self.plugin_name}' has no cost model")
