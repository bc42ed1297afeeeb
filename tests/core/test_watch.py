"""`replicate --watch` scheduling against in-memory plugins: VMs in parallel, a slow VM never
starves the others, a failing VM backs off, and stopping interrupts a cycle resumably."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from standby.core.config import Policy, Site
from standby.core.engine import CycleReport, Engine, status_rows
from standby.core.engine.watch import Watcher, schedule
from standby.core.errors import Interrupted, StandbyError, TransientError
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
from standby.core.state import State

SIZE = 16 * BLOCK
VMS = ("fast1", "fast2", "slow")


class FleetSource(Source):
    """A few VMs of one small disk each (every other block allocated, so a cycle reads 8
    pieces); `delay[vm]` seconds per read; `broken` VMs fail."""

    capabilities = SourceCapabilities(change_tracking=False, max_parallel_reads=2)

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        data = b"".join((b"\x01" if b % 2 == 0 else b"\x00") * BLOCK for b in range(SIZE // BLOCK))
        self.disks = {vm: bytearray(data) for vm in VMS}
        self.delay: dict[str, float] = {}
        self.broken: set[str] = set()
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def connect(self) -> None: ...
    def close(self) -> None: ...

    def list_vms(self) -> list[VMSpec]:
        return [
            VMSpec(id=vm, name=vm, cpus=1, memory_mib=64, disks=(DiskSpec("d0", SIZE, "mem"),))
            for vm in VMS
        ]

    @contextmanager
    def open_snapshot(
        self, vm: VMSpec, consistency: Consistency, since: Mapping[str, str | None]
    ) -> Iterator[Snapshot]:
        if vm.name in self.broken:
            raise TransientError(f"{vm.name}: host unreachable")
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            yield Snapshot(
                vm=vm,
                consistency=consistency,
                taken_at=datetime.now(UTC),
                since={"d0": None},
                tokens={"d0": None},
                handle=bytes(self.disks[vm.name]),
            )
        finally:
            with self._lock:
                self.active -= 1

    def changed_extents(self, snapshot: Snapshot, disk: str) -> Iterator[Extent]:
        for b in range(0, SIZE // BLOCK, 2):  # every other block: 8 pieces of one block
            yield Extent(b * BLOCK, BLOCK)

    def read(self, snapshot: Snapshot, disk: str, extent: Extent) -> bytes:
        time.sleep(self.delay.get(snapshot.vm.name, 0.0))
        return bytes(snapshot.handle[extent.offset : extent.end])


class FleetWriter(ReplicaWriter):
    def __init__(self, data: bytearray) -> None:
        self.data = data

    def write(self, disk: str, offset: int, data: Buffer) -> None:
        self.data[offset : offset + len(data)] = data

    def write_zeroes(self, disk: str, extent: Extent) -> None:
        self.data[extent.offset : extent.end] = bytes(extent.length)

    def read(self, disk: str, extent: Extent) -> bytes:
        return bytes(self.data[extent.offset : extent.end])

    def flush(self) -> None: ...

    def commit_point(self, point_id: int, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {"key": point_id}


class FleetTarget(Target):
    capabilities = TargetCapabilities()

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self.replicas: dict[int, bytearray] = {}

    def connect(self) -> None: ...
    def close(self) -> None: ...

    def validate(self, vm: VMSpec) -> Validation:
        return Validation()

    def prepare(self, protection: ProtectionInfo) -> None:
        self.replicas.setdefault(protection.id, bytearray(SIZE))

    @contextmanager
    def open_writer(
        self, protection: ProtectionInfo, cycle_id: int, base: PointInfo | None
    ) -> Iterator[ReplicaWriter]:
        yield FleetWriter(self.replicas[protection.id])

    def discard_pending(self, protection: ProtectionInfo, cycle_id: int) -> None: ...

    def prune(
        self, protection: ProtectionInfo, drop: list[PointInfo], keep: list[PointInfo]
    ) -> dict[int, dict[str, Any]]:
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
def fleet(tmp_path: Path) -> Iterator[tuple[Engine, FleetSource]]:
    (tmp_path / "sites").mkdir()
    for name in ("fsrc", "fdst"):
        (tmp_path / "sites" / f"{name}.toml").write_text('plugin = "memory"\n')
    state = State.at(tmp_path)
    engine = Engine(state, tmp_path, workers=1)
    src = FleetSource(Site("fsrc", "memory", tmp_path / "sites/fsrc.toml"))
    engine.use("fsrc", src)
    engine.use("fdst", FleetTarget(Site("fdst", "memory", tmp_path / "sites/fdst.toml")))
    for vm in VMS:
        engine.protect(vm, "fsrc", "fdst", Policy(rpo_seconds=2, retain_count=50))
    yield engine, src
    engine.close()
    state.dispose()


def watch_for(
    engine: Engine, seconds: float, **kw: Any
) -> tuple[list[CycleReport], list[tuple[str, StandbyError]]]:
    """Run a watcher for `seconds` in a thread; return its reports and errors."""
    reports: list[CycleReport] = []
    errors: list[tuple[str, StandbyError]] = []
    w = Watcher(
        engine,
        interval=0.2,
        on_report=reports.append,
        on_error=lambda vm, e: errors.append((vm, e)),
        **kw,
    )
    t = threading.Thread(target=w.run)
    t.start()
    time.sleep(seconds)
    w.stop.set()
    t.join(timeout=30)
    assert not t.is_alive()
    return reports, errors


def points(reports: list[CycleReport], vm: str) -> int:
    return sum(1 for r in reports if r.vm == vm)


def test_cycles_of_different_vms_run_in_parallel(fleet: Any) -> None:
    engine, src = fleet
    for vm in VMS:
        src.delay[vm] = 0.1  # 8 reads: about 0.8 s per cycle
    reports, errors = watch_for(engine, 1.5, parallel=3)
    assert not errors
    assert src.most_active == 3, "three VMs were copied at the same time"
    assert all(points(reports, vm) >= 1 for vm in VMS)


def test_a_slow_vm_never_starves_the_others(fleet: Any) -> None:
    engine, src = fleet
    src.delay["slow"] = 0.8  # a cycle of the slow VM takes about 6 s
    reports, errors = watch_for(engine, 4.0, parallel=2)
    assert not errors
    assert points(reports, "fast1") >= 2 and points(reports, "fast2") >= 2, reports
    assert src.most_active <= 2, "never more cycles at once than --parallel"


def test_one_slot_is_shared_fairly(fleet: Any) -> None:
    """With one slot, every due VM gets its turn, most overdue first."""
    engine, src = fleet
    src.delay["slow"] = 0.2  # about 1.6 s
    reports, errors = watch_for(engine, 5.0, parallel=1)
    assert not errors
    assert all(points(reports, vm) >= 1 for vm in VMS), [r.vm for r in reports]
    assert src.most_active == 1


def test_a_failing_vm_backs_off_and_the_others_go_on(fleet: Any) -> None:
    engine, src = fleet
    src.broken.add("slow")
    reports, errors = watch_for(engine, 2.5, parallel=1)
    assert points(reports, "fast1") >= 1 and points(reports, "fast2") >= 1
    failures = [vm for vm, _ in errors]
    assert failures and set(failures) == {"slow"}
    assert len(failures) <= 2, "the broken VM waits 5 s before its next attempt"


def test_stopping_interrupts_a_cycle_that_the_next_run_resumes(fleet: Any) -> None:
    engine, src = fleet
    src.delay["slow"] = 0.3
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    with pytest.raises(Interrupted):
        engine.replicate("slow", cancel=cancel)
    row = next(r for r in status_rows(engine.state, engine.home) if r["vm"] == "slow")
    assert row["points"] == 0 and row["health"] == "resumable"
    src.delay["slow"] = 0.0
    again = engine.replicate("slow")
    assert again.resumed and again.cycle_id == row["last_cycle"]["id"]


def test_schedule_puts_protections_without_a_point_first(fleet: Any) -> None:
    engine, _src = fleet
    engine.replicate("fast1")
    order = [d.vm for d in schedule(engine)]
    assert order[-1] == "fast1" and set(order) == set(VMS)
