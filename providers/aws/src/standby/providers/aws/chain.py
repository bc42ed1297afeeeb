"""Replica disks as EBS snapshot chains, written through the EBS direct APIs.

Per protection and disk, the replica is the newest completed snapshot (the head). A cycle
writes a pending snapshot started with `ParentSnapshotId = head`, so it inherits every block
and holds only what the cycle changed. `flush` seals it: blocks written in part are finished
by read-modify-write from the head, then `complete_snapshot` (count and LINEAR checksum
checked by the service), and it becomes the head; the next write starts the next one. A
recovery point is a set of heads, tagged `standby-point-<id>`; snapshots of a cycle between
its points (one per checkpoint) are deleted when the point commits. Nothing unsealed is ever
a point: a killed cycle's pending snapshot is deleted when the cycle is reopened, and its
sealed snapshots carry the cycle on.

Tags on every snapshot: `standby-protection`, `standby-disk`, `standby-cycle`, `standby-seq`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, ClassVar

from standby.core.errors import NotFound, PluginError, StandbyError
from standby.core.extents import Intervals
from standby.core.interfaces import Buffer, ReplicaWriter
from standby.core.model import DiskSpec, Extent, ProtectionInfo
from standby.providers.aws import ebs
from standby.providers.aws.conn import AwsClients, call, paged, tags_of

TAG_PROTECTION = "standby-protection"
TAG_DISK = "standby-disk"
TAG_CYCLE = "standby-cycle"
TAG_SEQ = "standby-seq"
POINT_PREFIX = "standby-point-"
PARTIAL_LIMIT = 128
"""Blocks written in part kept in memory per disk (64 MiB) before they are finished early."""
BLOCK = ebs.BLOCK
ZERO_BLOCK = bytes(BLOCK)


def point_tag(point_id: int) -> str:
    return f"{POINT_PREFIX}{point_id}"


class SharedLock:
    """Many writers at once, or one sealer alone (writes wait while a snapshot is sealed)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            self._cond.wait_for(lambda: self._shared == 0)
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass
class _Partial:
    """A block written in part: the bytes so far and the ranges of it they cover."""

    data: bytearray = field(default_factory=lambda: bytearray(BLOCK))
    covered: list[tuple[int, int]] = field(default_factory=list)

    def add(self, lo: int, piece: memoryview | bytes) -> None:
        self.data[lo : lo + len(piece)] = piece
        spans = sorted([*self.covered, (lo, lo + len(piece))])
        merged: list[tuple[int, int]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self.covered = merged

    def full(self, limit: int) -> bool:
        return bool(self.covered) and self.covered[0][0] == 0 and self.covered[0][1] >= limit

    def over(self, base: bytes) -> bytes:
        """The block: these bytes where written, `base` elsewhere."""
        out = bytearray(base)
        for s, e in self.covered:
            out[s:e] = self.data[s:e]
        return bytes(out)


@dataclass
class DiskChain:
    """One disk's state in a cycle: the head, the pending snapshot and what it holds."""

    spec: DiskSpec
    head: str | None
    seq: int
    pending: str | None = None
    digests: dict[int, bytes] = field(default_factory=dict)
    partial: dict[int, _Partial] = field(default_factory=dict)
    head_tokens: dict[int, str] | None = None
    present: set[int] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def dirty(self) -> bool:
        return self.pending is not None or bool(self.partial)


class Snapshots:
    """The protection's snapshots at the site (one describe call, filtered by tag)."""

    def __init__(self, clients: AwsClients, protection: ProtectionInfo) -> None:
        self.c = clients
        self.p = protection

    def all(self) -> list[dict[str, Any]]:
        return list(
            paged(
                "describe snapshots",
                self.c.ec2.describe_snapshots,
                "Snapshots",
                OwnerIds=["self"],
                Filters=[{"Name": f"tag:{TAG_PROTECTION}", "Values": [str(self.p.id)]}],
            )
        )

    def delete(self, snap_ids: list[str]) -> None:
        for snap_id in snap_ids:
            with suppress(NotFound):
                call(f"delete snapshot {snap_id}", self.c.ec2.delete_snapshot, SnapshotId=snap_id)

    @staticmethod
    def of_cycle(cycle_id: int, listing: list[dict[str, Any]]) -> list[str]:
        """Snapshots of a cycle in `listing` that no point holds (sealed or not)."""
        return [
            str(s["SnapshotId"])
            for s in listing
            if tags_of(s).get(TAG_CYCLE) == str(cycle_id)
            and not any(k.startswith(POINT_PREFIX) for k in tags_of(s))
        ]

    def of_point(self, point_id: int, listing: list[dict[str, Any]]) -> dict[str, str]:
        """Disk -> snapshot of a committed point in `listing` (empty when never committed)."""
        key = point_tag(point_id)
        out = {}
        for s in listing:
            tags = tags_of(s)
            if key in tags and s.get("State") == "completed":
                out[tags.get(TAG_DISK, "")] = str(s["SnapshotId"])
        return out


class ChainWriter(ReplicaWriter):
    """One cycle's writes into the protection's snapshot chains."""

    checkpoint_seconds: ClassVar[float] = 30.0

    def __init__(
        self,
        clients: AwsClients,
        protection: ProtectionInfo,
        cycle_id: int,
        base: Mapping[str, str],
        pool: ThreadPoolExecutor,
    ) -> None:
        self.c = clients
        self.p = protection
        self.cycle_id = cycle_id
        self.base = dict(base)
        self.pool = pool
        self.snaps = Snapshots(clients, protection)
        self.rw = SharedLock()
        self.disks: dict[str, DiskChain] = {}

    # ------------------------------------------------------------ opening

    def open(self) -> ChainWriter:
        """Find the cycle's sealed snapshots (it resumes from the newest); drop unsealed ones."""
        mine: dict[str, list[tuple[int, str]]] = {}
        stale: list[str] = []
        for s in self.snaps.all():
            tags = tags_of(s)
            if tags.get(TAG_CYCLE) != str(self.cycle_id) or any(
                k.startswith(POINT_PREFIX) for k in tags
            ):
                continue
            if s.get("State") == "completed":
                mine.setdefault(tags.get(TAG_DISK, ""), []).append(
                    (int(tags.get(TAG_SEQ, "0")), str(s["SnapshotId"]))
                )
            else:
                stale.append(str(s["SnapshotId"]))
        with suppress(StandbyError):  # left for discard_pending / remove when it fails
            self.snaps.delete(stale)
        for spec in self.p.vm.disks:
            if spec.size > ebs.MAX_DIRECT:
                raise PluginError(f"disk '{spec.name}' is larger than the EBS direct APIs' 16 TiB")
            sealed = sorted(mine.get(spec.name, []))
            head = sealed[-1][1] if sealed else self.base.get(spec.name)
            seq = sealed[-1][0] + 1 if sealed else 1
            self.disks[spec.name] = DiskChain(spec, head, seq)
        return self

    def _disk(self, name: str) -> DiskChain:
        try:
            return self.disks[name]
        except KeyError:
            raise PluginError(f"VM '{self.p.vm.name}' has no disk '{name}'") from None

    # ------------------------------------------------------------ blocks

    def _tokens(self, d: DiskChain) -> dict[int, str]:
        """Block tokens of the head (listed once per head)."""
        with d.lock:
            if d.head_tokens is not None or d.head is None:
                return d.head_tokens or {}
            head = d.head
        tokens = ebs.list_blocks(self.c.ebs, head)
        with d.lock:
            if d.head == head:
                d.head_tokens = tokens
                if d.present is None:
                    d.present = set(tokens)
        return tokens

    def _present(self, d: DiskChain) -> set[int]:
        """Blocks the head holds (zero blocks outside it need no write)."""
        if d.present is None:
            if d.head is None:
                d.present = set()
            else:
                self._tokens(d)
        return d.present or set()

    def _head_block(self, d: DiskChain, idx: int) -> bytes:
        token = self._tokens(d).get(idx)
        if token is None or d.head is None:
            return bytes(BLOCK)
        return ebs.get_block(self.c.ebs, d.head, idx, token)

    def _pending(self, d: DiskChain) -> str:
        with d.lock:
            if d.pending is None:
                tags = {
                    TAG_PROTECTION: str(self.p.id),
                    TAG_DISK: d.spec.name,
                    TAG_CYCLE: str(self.cycle_id),
                    TAG_SEQ: str(d.seq),
                    "Name": f"standby {self.p.vm.name} {d.spec.name}",
                }
                d.pending = ebs.start(
                    self.c.ebs,
                    d.spec.size,
                    d.head,
                    tags,
                    f"standby replica of {self.p.vm.name}/{d.spec.name}, cycle {self.cycle_id}",
                )
            return d.pending

    def _put(self, d: DiskChain, idx: int, data: bytes | memoryview) -> None:
        snap = self._pending(d)
        digest = ebs.put_block(self.c.ebs, snap, idx, data)
        with d.lock:
            d.digests[idx] = digest

    def _limit(self, d: DiskChain, idx: int) -> int:
        """How much of block `idx` lies inside the disk (the last block may be short)."""
        return min(BLOCK, d.spec.size - idx * BLOCK)

    def _pieces(
        self, d: DiskChain, offset: int, data: memoryview | None, length: int
    ) -> list[tuple[int, bytes | memoryview]]:
        """Split a write (None: zeroes) into whole blocks to put; parts go to the buffer."""
        if offset < 0 or offset + length > d.spec.size:
            raise PluginError(
                f"write of {length} bytes at {offset} is outside disk '{d.spec.name}'"
            )
        whole: list[tuple[int, bytes | memoryview]] = []
        pos = 0
        while pos < length:
            idx, lo = divmod(offset + pos, BLOCK)
            n = min(BLOCK - lo, length - pos)
            piece = data[pos : pos + n] if data is not None else ZERO_BLOCK[:n]
            limit = self._limit(d, idx)
            if lo == 0 and n >= limit:
                if data is None:
                    block: bytes | memoryview = ZERO_BLOCK
                else:
                    block = piece if n == BLOCK else bytes(piece) + bytes(BLOCK - n)
                with d.lock:  # the whole block supersedes what was written of it before
                    d.partial.pop(idx, None)
                whole.append((idx, block))
            else:
                with d.lock:
                    part = d.partial.setdefault(idx, _Partial())
                    part.add(lo, piece)
                    if part.full(limit):
                        del d.partial[idx]
                        whole.append((idx, part.over(ZERO_BLOCK)))
            pos += n
        return whole

    def _send(self, d: DiskChain, whole: list[tuple[int, bytes | memoryview]]) -> None:
        """Put whole blocks (zero blocks the head does not hold are skipped), in flight
        together; then finish early the oldest partial blocks if too many are held."""
        todo = []
        for idx, block in whole:
            zero = block is ZERO_BLOCK or block == ZERO_BLOCK
            if zero and idx not in d.digests and idx not in self._present(d):
                continue
            todo.append((idx, block))
        self._put_all(d, todo)
        if len(d.partial) > PARTIAL_LIMIT:
            with d.lock:  # taken out here, so two writers never finish the same block
                early = [i for i in sorted(d.partial) if i not in d.digests][: PARTIAL_LIMIT // 2]
                parts = {i: d.partial.pop(i) for i in early}
            self._finish(d, early, parts)

    def _put_all(self, d: DiskChain, todo: list[tuple[int, bytes | memoryview]]) -> None:
        if len(todo) <= 1:
            for idx, block in todo:
                self._put(d, idx, block)
            return
        self._pending(d)
        for f in [self.pool.submit(self._put, d, i, b) for i, b in todo]:
            f.result()

    def _finish(
        self, d: DiskChain, indexes: list[int], parts: dict[int, _Partial] | None = None
    ) -> None:
        """Read-modify-write of partial blocks from the head (they are not in the pending
        snapshot: their base is the head's block). `parts`: blocks already taken out of the
        buffer by the caller."""

        def one(idx: int) -> None:
            if parts is not None:
                part: _Partial | None = parts[idx]
            else:
                with d.lock:
                    part = d.partial.get(idx)
            if part is None:
                return
            self._put(d, idx, part.over(self._head_block(d, idx)))
            if parts is None:  # sealing: no writer runs, the buffer is ours
                with d.lock:
                    d.partial.pop(idx, None)

        for f in [self.pool.submit(one, i) for i in indexes]:
            f.result()

    # ------------------------------------------------------------ ReplicaWriter

    def write(self, disk: str, offset: int, data: Buffer) -> None:
        self.write_many(disk, [(offset, data)])

    def write_many(self, disk: str, pieces: list[tuple[int, Buffer]]) -> None:
        d = self._disk(disk)
        with self.rw.shared():
            whole: list[tuple[int, bytes | memoryview]] = []
            for offset, data in pieces:
                view = memoryview(data).cast("B")
                whole += self._pieces(d, offset, view, len(view))
            self._send(d, whole)

    def write_zeroes(self, disk: str, extent: Extent) -> None:
        d = self._disk(disk)
        with self.rw.shared():
            self._send(d, self._pieces(d, extent.offset, None, extent.length))

    def read(self, disk: str, extent: Extent) -> bytes:
        """Bytes as written so far: a block still pending is sealed first, then read."""
        d = self._disk(disk)
        first, last = extent.offset // BLOCK, (extent.end - 1) // BLOCK
        span = range(first, last + 1)
        with d.lock:
            unsealed = any(i in d.digests or i in d.partial for i in span)
        if unsealed:
            with self.rw.exclusive():
                self._seal(d)
        blocks = [self.pool.submit(self._head_block, d, i) for i in span]
        joined = b"".join(f.result() for f in blocks)
        lo = extent.offset - first * BLOCK
        return joined[lo : lo + extent.length]

    def flush(self) -> None:
        """Seal every disk's pending snapshot (each completed and `completed` when it returns)."""
        with self.rw.exclusive():
            for d in self.disks.values():
                self._seal(d)

    def _seal(self, d: DiskChain) -> None:
        """Finish partial blocks, complete the pending snapshot, make it the head. A partial
        block over a block this snapshot already holds is finished in a second round (its
        base is readable only once sealed)."""
        while d.dirty():
            with d.lock:
                over_pending = {i for i in d.partial if i in d.digests}
                ready = [i for i in sorted(d.partial) if i not in over_pending]
            self._finish(d, ready)
            if d.pending is not None:
                ebs.complete(self.c.ebs, d.pending, d.digests)
                timeout = self.c.opts.operation_timeout
                ebs.wait_completed(self.c.ec2, [d.pending], timeout, self.c.opts.poll_seconds)
                present = self._present(d) | set(d.digests)
                with d.lock:
                    d.head, d.pending, d.digests = d.pending, None, {}
                    d.head_tokens, d.present = None, present
                    d.seq += 1
            elif over_pending:
                raise PluginError("partial blocks over a pending snapshot that is gone")

    def unproven(self, disk: str, written: Intervals, planned: Intervals) -> Intervals:
        """Every block carried its SHA-256, checked by the service before it stored it, and
        every snapshot was completed with the count and LINEAR checksum of its blocks, which
        the service checked too: nothing is left to read back."""
        return []

    def notes(self) -> list[str]:
        note = self.c.retries.note("AWS target")
        return [note] if note else []

    def heads(self) -> dict[str, str]:
        """Disk -> its head after a flush; a disk never written gets an empty snapshot."""
        self.flush()
        out = {}
        for name, d in self.disks.items():
            if d.head is None:
                self._pending(d)
                with self.rw.exclusive():
                    self._seal(d)
            assert d.head is not None
            out[name] = d.head
        return out

    def commit_point(self, point_id: int, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Tag the heads as point `point_id`, delete the cycle's intermediate snapshots."""
        listing = self.snaps.all()
        done = self.snaps.of_point(point_id, listing)
        if set(done) >= set(self.disks):
            heads = {k: done[k] for k in self.disks}
        else:
            heads = self.heads()
            call(
                "tag point snapshots",
                self.c.ec2.create_tags,
                Resources=sorted(set(heads.values())),
                Tags=[{"Key": point_tag(point_id), "Value": str(self.cycle_id)}],
            )
        keep = set(heads.values()) | set(self.base.values())
        # `listing` predates the seal: what sealing made are heads, which are kept anyway
        self.snaps.delete([s for s in self.snaps.of_cycle(self.cycle_id, listing) if s not in keep])
        return {
            "point": point_id,
            "snapshots": heads,
            "sizes": {d.spec.name: d.spec.size for d in self.disks.values()},
        }


def discard(clients: AwsClients, protection: ProtectionInfo, cycle_id: int) -> None:
    """Delete what an abandoned cycle wrote (snapshots of it that no point holds)."""
    snaps = Snapshots(clients, protection)
    snaps.delete(snaps.of_cycle(cycle_id, snaps.all()))


def prune(
    clients: AwsClients, protection: ProtectionInfo, drop: list[Any], keep: list[Any]
) -> None:
    """Delete the dropped points' snapshots no kept point holds (untag the ones it does).

    EBS snapshots are incremental but independent: deleting a parent never loses a block
    a child needs, so kept points never move."""
    snaps = Snapshots(clients, protection)
    used = {s for p in keep for s in p.ref.get("snapshots", {}).values()}
    for point in drop:
        for sid in point.ref.get("snapshots", {}).values():
            if sid in used:
                with suppress(StandbyError):
                    call(
                        "untag snapshot",
                        clients.ec2.delete_tags,
                        Resources=[sid],
                        Tags=[{"Key": point_tag(point.id)}],
                    )
            else:
                snaps.delete([sid])
