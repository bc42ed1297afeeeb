"""Engine logic against in-memory plugins: verification, failures mid-cycle, retention, fallback.

These doubles follow the contracts (the physical plugin is tested for real elsewhere); they
exist to drive the engine into states a real platform reaches only by accident.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from standby.core.config import Policy, Site
from standby.core.engine import Engine
from standby.core.errors import TransientError
from standby.core.extents import BLOCK
from standby.core.interfaces import (
    Buffer,
    ReplicaWriter,
    Snapshot,
    Source,
    SourceCapabilities,
    Target,
    TargetCapabilities,
)
from standby.core.model import (
    Consistency,
    DiskSpec,
    Extent,
    FailoverResult,
    PointInfo,
    ProtectionInfo,
    Validation,
    VMSpec,
)
from standby.core.state import RecoveryPoint, State

SIZE = 64 * BLOCK


class MemSource(Source):
    capabilities = SourceCapabilities(change_tracking=True, app_consistent=True)

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self.disk = bytearray(SIZE)
        self.dirty: set[int] = set(range(SIZE // BLOCK))
        self.generation = 0
        self.valid: set[str] = set()
        self.reads = 0

    def connect(self) -> None: ...
    def close(self) -> None: ...

    def write(self, offset: int, data: bytes) -> None:
        self.disk[offset : offset + len(data)] = data
        self.dirty.update(range(offset // BLOCK, -(-(offset + len(data)) // BLOCK)))

    def list_vms(self) -> list[VMSpec]:
        return [
            VMSpec(
                id="m1",
                name="mem1",
                cpus=1,
                memory_mib=64,
                disks=(DiskSpec(name="d0", size=SIZE, format="mem"),),
            )
        ]

    @contextmanager
    def open_snapshot(
        self, vm: VMSpec, consistency: Consistency, since: Mapping[str, str | None]
    ) -> Iterator[Snapshot]:
        base = since.get("d0")
        self.generation += 1
        token = f"g{self.generation}"
        changed = set(self.dirty) if base in self.valid else None
        self.dirty.clear()
        self.valid.add(token)
        yield Snapshot(
            vm=vm,
            consistency=consistency,
            taken_at=datetime.now(UTC),
            since={"d0": base if changed is not None else None},
            tokens={"d0": token},
            handle=(bytes(self.disk), changed),
        )

    def changed_extents(self, snapshot: Snapshot, disk: str) -> Iterator[Extent]:
        data, changed = snapshot.handle
        blocks = changed if changed is not None else range(SIZE // BLOCK)
        for b in sorted(blocks):
            if changed is not None or any(data[b * BLOCK : (b + 1) * BLOCK]):
                yield Extent(b * BLOCK, BLOCK)

    def read(self, snapshot: Snapshot, disk: str, extent: Extent) -> bytes:
        self.reads += extent.length
        return bytes(snapshot.handle[0][extent.offset : extent.end])

    def token_valid(self, vm: VMSpec, token: str) -> bool:
        return token in self.valid

    def release_tokens(self, vm: VMSpec, keep: Mapping[str, str | None]) -> None:
        self.valid = {t for t in keep.values() if t}


class MemWriter(ReplicaWriter):
    def __init__(self, target: MemTarget, cycle: int) -> None:
        self.t = target
        self.cycle = cycle

    def write(self, disk: str, offset: int, data: Buffer) -> None:
        if self.t.fail_after is not None:
            if self.t.fail_after <= 0:
                raise TransientError("target went away")
            self.t.fail_after -= 1
        self.t.pending[self.cycle][offset : offset + len(data)] = data

    def write_zeroes(self, disk: str, extent: Extent) -> None:
        self.t.pending[self.cycle][extent.offset : extent.end] = bytes(extent.length)

    def read(self, disk: str, extent: Extent) -> bytes:
        data = bytes(self.t.pending[self.cycle][extent.offset : extent.end])
        if self.t.corrupt_reads:
            self.t.corrupt_reads -= 1
            return b"\x99" + data[1:]
        return data

    def flush(self) -> None:
        self.t.flushes += 1

    def commit_point(self, point_id: int, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        self.t.points[point_id] = bytes(self.t.pending[self.cycle])
        if self.t.die_after_commit:
            self.t.die_after_commit = False
            raise TransientError("connection lost after the target sealed the point")
        return {"key": point_id}


class MemTarget(Target):
    capabilities = TargetCapabilities(test_failover=False)

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self.pending: dict[int, bytearray] = {}
        self.points: dict[int, bytes] = {}
        self.fail_after: int | None = None
        self.corrupt_reads = 0
        self.die_after_commit = False
        self.flushes = 0
        self.pruned: list[int] = []

    def connect(self) -> None: ...
    def close(self) -> None: ...

    def validate(self, vm: VMSpec) -> Validation:
        return Validation()

    def prepare(self, protection: ProtectionInfo) -> None: ...

    @contextmanager
    def open_writer(
        self, protection: ProtectionInfo, cycle_id: int, base: PointInfo | None
    ) -> Iterator[ReplicaWriter]:
        if cycle_id not in self.pending:
            start = self.points[base.ref["key"]] if base else bytes(SIZE)
            self.pending[cycle_id] = bytearray(start)
        yield MemWriter(self, cycle_id)

    def discard_pending(self, protection: ProtectionInfo, cycle_id: int) -> None:
        self.pending.pop(cycle_id, None)

    def prune(
        self, protection: ProtectionInfo, drop: list[PointInfo], keep: list[PointInfo]
    ) -> dict[int, dict[str, Any]]:
        for p in drop:
            self.points.pop(p.ref["key"], None)
            self.pruned.append(p.id)
        return {}

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
        raise NotImplementedError

    def cleanup_test(self, protection: ProtectionInfo, ref: Mapping[str, Any]) -> None: ...

    def remove(self, protection: ProtectionInfo, points: list[PointInfo]) -> None: ...


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Engine, MemSource, MemTarget]]:
    (tmp_path / "sites").mkdir()
    for name in ("msrc", "mdst"):
        (tmp_path / "sites" / f"{name}.toml").write_text('plugin = "memory"\n')
    state = State.at(tmp_path)
    engine = Engine(state, tmp_path, workers=3)
    src = MemSource(Site("msrc", "memory", tmp_path / "sites/msrc.toml"))
    dst = MemTarget(Site("mdst", "memory", tmp_path / "sites/mdst.toml"))
    engine.use("msrc", src)
    engine.use("mdst", dst)
    yield engine, src, dst
    state.dispose()


def latest_key(engine: Engine) -> int:
    with engine.state.session() as s:
        p = engine.state.protection(s, "mem1")
        visible = [x for x in p.points if x.state == "visible"]
        return int(visible[-1].ref["key"])


def test_full_then_incremental_and_identical_rewrites(rig: Any) -> None:
    engine, src, dst = rig
    src.write(0, b"\x01" * BLOCK * 3)
    engine.protect("mem1", "msrc", "mdst", Policy())
    full = engine.replicate("mem1")
    assert full.kind == "full" and full.bytes_read == 3 * BLOCK
    src.write(BLOCK, b"\x01" * BLOCK)  # same bytes again
    src.write(10 * BLOCK, b"\x02" * 100)
    inc = engine.replicate("mem1")
    assert inc.kind == "incremental" and inc.bytes_read == 2 * BLOCK
    assert inc.bytes_written == BLOCK
    assert dst.points[latest_key(engine)] == bytes(src.disk)


def test_failed_verification_makes_no_point_and_the_next_run_repairs(rig: Any) -> None:
    engine, src, dst = rig
    src.write(0, b"\x07" * BLOCK * 4)
    engine.protect("mem1", "msrc", "mdst", Policy())
    dst.corrupt_reads = 1
    with pytest.raises(TransientError, match="verification failed"):
        engine.replicate("mem1")
    with engine.state.session() as s:
        assert s.query(RecoveryPoint).count() == 0
    again = engine.replicate("mem1")
    assert again.resumed
    assert dst.points[latest_key(engine)] == bytes(src.disk)


def test_write_failure_mid_cycle_resumes_with_changes_since(rig: Any) -> None:
    engine, src, dst = rig
    for i in range(0, 40, 2):  # separate runs: one write each
        src.write(i * BLOCK, bytes([i + 1]) * BLOCK)
    engine.protect("mem1", "msrc", "mdst", Policy())
    dst.fail_after = 5
    with pytest.raises(TransientError):
        engine.replicate("mem1")
    dst.fail_after = None
    src.write(2 * BLOCK, b"\xee" * BLOCK)  # likely copied before the failure
    src.write(39 * BLOCK, b"\xdd" * BLOCK)  # likely not
    src.write(50 * BLOCK, b"\xcc" * BLOCK)  # new data
    done = engine.replicate("mem1")
    assert done.resumed
    assert dst.points[latest_key(engine)] == bytes(src.disk)


def test_retention_and_token_loss_fallback(rig: Any) -> None:
    engine, src, dst = rig
    src.write(0, b"\x05" * BLOCK)
    engine.protect("mem1", "msrc", "mdst", Policy(retain_count=2))
    for i in range(4):
        src.write((i + 1) * BLOCK, bytes([i + 9]) * BLOCK)
        engine.replicate("mem1")
    assert len(dst.pruned) == 2
    src.valid.clear()  # the source lost its change tracking (e.g. checkpoints deleted)
    src.write(30 * BLOCK, b"\x31" * BLOCK)
    src.write(0, bytes(BLOCK))  # a block zeroed at the source
    r = engine.replicate("mem1")
    assert r.kind == "hashcompare"
    assert r.bytes_written == BLOCK and r.bytes_zeroed == BLOCK
    assert dst.points[latest_key(engine)] == bytes(src.disk)


def test_app_consistent_when_due(rig: Any) -> None:
    engine = rig[0]
    engine.protect("mem1", "msrc", "mdst", Policy(app_consistent_every_seconds=3600))
    assert engine.replicate("mem1").consistency == "app"
    assert engine.replicate("mem1").consistency == "crash"


def test_interrupted_commit_is_finished_without_a_new_snapshot(rig: Any) -> None:
    engine, src, dst = rig
    src.write(0, b"\x42" * BLOCK)
    engine.protect("mem1", "msrc", "mdst", Policy())
    dst.die_after_commit = True
    with pytest.raises(TransientError):
        engine.replicate("mem1")
    with engine.state.session() as s:
        assert s.query(RecoveryPoint).count() == 0, "sealed at the target is not yet visible"
    snapshots = src.generation
    done = engine.replicate("mem1")
    assert done.resumed and src.generation == snapshots
    assert dst.points[latest_key(engine)] == bytes(src.disk)
