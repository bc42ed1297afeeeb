"""A cycle's write session into fresh qcow2 overlays served over NBD (one export per disk).

Shared by the targets that keep replicas as qcow2 chains: what serves the exports (a paused
QEMU through libvirt, a qemu-storage-daemon) and how a point is sealed are theirs
(`commit_point`); writes, zeroes, read-back, flush and the write proof are the same.
"""

from __future__ import annotations

from pathlib import Path

from standby.core.errors import StandbyError, TransientError
from standby.core.extents import Intervals, subtract, union
from standby.core.imagefiles import qcow2
from standby.core.imagefiles.nbd import NbdPool, nbd_module
from standby.core.interfaces import Buffer, ReplicaWriter
from standby.core.model import Extent


class OverlayWriter(ReplicaWriter):
    """Writes through `pool` into the overlays `files` (disk name -> qcow2 path)."""

    def __init__(self, files: dict[str, Path], pool: NbdPool, cycle_id: int) -> None:
        self.files = files
        self.pool = pool
        self.cycle_id = cycle_id
        self.committed = False

    def failed(self, disk: str, what: str, exc: Exception) -> StandbyError:
        """The error a failed NBD call becomes (transient by default: retried)."""
        return TransientError(f"replica of disk '{disk}': {what} failed: {exc}")

    def write(self, disk: str, offset: int, data: Buffer) -> None:
        try:
            self.pool.handle(disk).pwrite(data, offset)
        except nbd_module().Error as exc:
            raise self.failed(disk, f"write at {offset}", exc) from exc

    def write_zeroes(self, disk: str, extent: Extent) -> None:
        try:
            self.pool.handle(disk).zero(extent.length, extent.offset)
        except nbd_module().Error as exc:
            raise self.failed(disk, "zeroing", exc) from exc

    def read(self, disk: str, extent: Extent) -> Buffer:
        try:
            return self.pool.handle(disk).pread(extent.length, extent.offset)  # type: ignore[no-any-return]
        except nbd_module().Error as exc:
            raise self.failed(disk, "read-back", exc) from exc

    def flush(self) -> None:
        self.pool.flush()

    def unproven(self, disk: str, written: Intervals, planned: Intervals) -> Intervals:
        """The cycle's overlay is a fresh qcow2: the clusters allocated in it are exactly what
        was written (its L2 tables, read from the file after the flush). Writes that are not
        there, and clusters outside the plan, are what a read-back must check."""
        held = qcow2.allocated(self.files[disk])
        return union(subtract(written, held), subtract(held, planned))

    def ref(self) -> dict[str, object]:
        """The point's ref: its overlay files and the cycle that wrote them."""
        return {"files": {d: str(p) for d, p in self.files.items()}, "cycle": self.cycle_id}
