"""The contract test kit every plugin's tests subclass.

A plugin's test module defines `class TestMySource(SourceContract)` and provides fixtures:

- `source`: a connected `Source`;
- `contract_vm`: the id or name of a running VM with at least one disk;
- `mutate`: a callable `(vm_key, disk, offset, length, byte)` writing into that VM's disk as its
  guest would (used to check incremental extents).

and `class TestMyTarget(TargetContract)` with fixtures:

- `target`: a connected `Target`;
- `contract_protection`: a `ProtectionInfo` for a small VM (disks of a few MiB);
- `read_point`: `(protection, point_info, disk, offset, length) -> bytes` reading a committed
  point's bytes through the platform (independently of the writer).

Every test here checks behaviour the engine relies on; a plugin passes the kit or says which
capability flag excuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from standby.core.errors import NotFound
from standby.core.interfaces import Source, Target
from standby.core.model import Consistency, DiskSpec, Extent, PointInfo, ProtectionInfo, VMSpec

MiB = 1 << 20


def _point(pid: int, ref: dict[str, Any], vm: VMSpec) -> PointInfo:
    return PointInfo(
        id=pid, created_at=datetime.now(UTC), ref=ref, disks={d.name: d.size for d in vm.disks}
    )


class SourceContract:
    """What every `Source` must do."""

    def test_inventory_lists_the_vm(self, source: Source, contract_vm: str) -> None:
        vms = source.list_vms()
        assert any(contract_vm in (v.id, v.name) for v in vms)
        vm = source.get_vm(contract_vm)
        assert vm.cpus >= 1 and vm.memory_mib > 0 and vm.disks
        assert all(d.size > 0 and d.name for d in vm.disks)

    def test_unknown_vm_is_not_found(self, source: Source) -> None:
        try:
            source.get_vm("no-such-vm-4f1c")
        except NotFound as exc:
            assert "no-such-vm-4f1c" in str(exc)
        else:
            raise AssertionError("get_vm of an unknown VM must raise NotFound")

    def test_full_snapshot_reads_what_the_guest_wrote(
        self, source: Source, contract_vm: str, mutate: Callable[..., None]
    ) -> None:
        vm = source.get_vm(contract_vm)
        disk = vm.disks[0]
        mutate(contract_vm, disk.name, 3 * MiB, 128 * 1024, 0x5A)
        with source.open_snapshot(vm, Consistency.CRASH, {d.name: None for d in vm.disks}) as s:
            extents = list(source.changed_extents(s, disk.name))
            assert any(e.offset <= 3 * MiB and e.end >= 3 * MiB + 128 * 1024 for e in extents)
            assert all(0 <= e.offset < e.end <= disk.size for e in extents)
            data = source.read(s, disk.name, Extent(3 * MiB, 128 * 1024))
            assert data == bytes([0x5A]) * 128 * 1024
            assert s.taken_at.tzinfo is not None

    def test_incremental_reports_only_the_change(
        self, source: Source, contract_vm: str, mutate: Callable[..., None]
    ) -> None:
        if not source.capabilities.change_tracking:
            return
        vm = source.get_vm(contract_vm)
        disk = vm.disks[0]
        if not disk.change_tracking:
            return
        with source.open_snapshot(vm, Consistency.CRASH, {d.name: None for d in vm.disks}) as s:
            tokens = dict(s.tokens)
        assert tokens[disk.name], "a change-tracking disk must get a token"
        assert source.token_valid(vm, str(tokens[disk.name]))
        mutate(contract_vm, disk.name, 5 * MiB, 64 * 1024, 0xC3)
        with source.open_snapshot(vm, Consistency.CRASH, tokens) as s:
            assert s.since[disk.name] == tokens[disk.name]
            extents = list(source.changed_extents(s, disk.name))
            changed = sum(e.length for e in extents)
            assert any(e.offset <= 5 * MiB and e.end >= 5 * MiB + 64 * 1024 for e in extents)
            assert changed <= 1 * MiB, f"incremental reported {changed} bytes for a 64 KiB write"
            assert source.read(s, disk.name, Extent(5 * MiB, 64 * 1024)) == b"\xc3" * 65536
            newer = dict(s.tokens)
        source.release_tokens(vm, newer)
        if source.capabilities.tokens_released:
            assert not source.token_valid(vm, str(tokens[disk.name]))
        assert source.token_valid(vm, str(newer[disk.name]))

    def test_app_consistency_is_honest(self, source: Source, contract_vm: str) -> None:
        vm = source.get_vm(contract_vm)
        with source.open_snapshot(vm, Consistency.APP, {d.name: None for d in vm.disks}) as s:
            if s.consistency is Consistency.CRASH:
                assert s.notes, "a downgraded snapshot must say why"


class TargetContract:
    """What every `Target` must do."""

    def test_validate_accepts_small_and_refuses_huge(
        self, target: Target, contract_protection: ProtectionInfo
    ) -> None:
        assert target.validate(contract_protection.vm).ok
        huge = VMSpec(
            id="huge",
            name="huge",
            cpus=1,
            memory_mib=64,
            disks=(DiskSpec(name="vda", size=target.capabilities.max_disk_size * 2),),
        )
        verdict = target.validate(huge)
        assert not verdict.ok and any("vda" in p for p in verdict.problems)

    def test_points_are_immutable_and_chained(
        self,
        target: Target,
        contract_protection: ProtectionInfo,
        read_point: Callable[..., bytes],
    ) -> None:
        p = contract_protection
        disk = p.vm.disks[0].name
        target.prepare(p)
        with target.open_writer(p, 1, None) as w:
            w.write(disk, 0, b"\x01" * 65536)
            w.write_zeroes(disk, Extent(65536, 65536))
            w.flush()
            assert w.read(disk, Extent(0, 65536)) == b"\x01" * 65536
            ref1 = w.commit_point(1)
            assert w.commit_point(1) == ref1, "commit_point must be idempotent"
        first = _point(1, ref1, p.vm)
        with target.open_writer(p, 2, first) as w:
            assert w.read(disk, Extent(0, 65536)) == b"\x01" * 65536, "cycle sees its base"
            w.write(disk, 0, b"\x02" * 65536)
            w.flush()
            ref2 = w.commit_point(2)
        second = _point(2, ref2, p.vm)
        assert read_point(p, first, disk, 0, 65536) == b"\x01" * 65536
        assert read_point(p, second, disk, 0, 65536) == b"\x02" * 65536
        moved = target.prune(p, [first], [second])
        second = _point(2, moved.get(2, ref2), p.vm)
        assert read_point(p, second, disk, 0, 65536) == b"\x02" * 65536
        target.remove(p, [second])

    def test_reopened_cycle_keeps_its_writes(
        self, target: Target, contract_protection: ProtectionInfo
    ) -> None:
        p = contract_protection
        disk = p.vm.disks[0].name
        target.prepare(p)
        with target.open_writer(p, 7, None) as w:
            w.write(disk, 131072, b"\x07" * 65536)
            w.flush()
        with target.open_writer(p, 7, None) as w:
            assert w.read(disk, Extent(131072, 65536)) == b"\x07" * 65536
        target.discard_pending(p, 7)
        with target.open_writer(p, 7, None) as w:
            assert w.read(disk, Extent(131072, 65536)) == bytes(65536)
        target.discard_pending(p, 7)
        target.remove(p, [])

    def test_test_failover_and_cleanup(
        self, target: Target, contract_protection: ProtectionInfo
    ) -> None:
        if not target.capabilities.test_failover:
            return
        p = contract_protection
        disk = p.vm.disks[0].name
        target.prepare(p)
        with target.open_writer(p, 1, None) as w:
            w.write(disk, 0, b"\x09" * 65536)
            ref = w.commit_point(1)
        point = _point(1, ref, p.vm)
        result = target.failover(p, point, test=True)
        assert result.vm_name and result.ref
        target.cleanup_test(p, result.ref)
        target.cleanup_test(p, result.ref)  # idempotent
        target.remove(p, [point])
