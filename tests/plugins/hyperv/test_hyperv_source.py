"""The Hyper-V source against the WinRM double and Samba: the core's contract kit, then what
is Hyper-V's own (checkpoints, RCT, the round trips a cycle costs)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from standby.core.model import Consistency, Extent
from standby.core.testing import SourceContract
from standby.plugins.hyperv.source import HyperVSource
from support.hyperv import HyperVLab, start_hyperv

MiB = 1 << 20


@pytest.fixture(scope="module")
def hv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HyperVLab]:
    lab = start_hyperv(tmp_path_factory.mktemp("hv"))
    lab.model.add_vm("web01", [16, 8])
    lab.model.add_vm("nosvc", [8], vss=False)
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture(scope="module")
def source(hv: HyperVLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HyperVSource]:
    src = HyperVSource(hv.site(tmp_path_factory.mktemp("home")))
    src.connect()
    try:
        yield src
    finally:
        src.close()


@pytest.fixture(scope="module")
def contract_vm() -> str:
    return "web01"


@pytest.fixture
def mutate(hv: HyperVLab) -> Callable[..., None]:
    def write(vm: str, disk: str, offset: int, length: int, byte: int) -> None:
        index = next(i for i, d in enumerate(hv.model.vms[vm].disks) if d.name == disk)
        hv.model.guest_write(vm, index, offset, bytes([byte]) * length)

    return write


class TestHyperVSource(SourceContract):
    """Source side of the kit."""


def test_a_cycle_is_two_round_trips_and_leaves_no_checkpoint(
    hv: HyperVLab, source: HyperVSource
) -> None:
    vm = source.get_vm("web01")
    before = source.ps.round_trips
    with source.open_snapshot(vm, Consistency.APP, {d.name: None for d in vm.disks}) as snap:
        assert snap.consistency is Consistency.APP and not snap.notes
        assert hv.model.vms["web01"].checkpoints, "the checkpoint exists while it is read"
        for disk in vm.disks:
            for e in source.changed_extents(snap, disk.name):
                source.read(snap, disk.name, e)
    assert source.ps.round_trips - before == 2
    assert not hv.model.vms["web01"].checkpoints


def test_production_checkpoint_falls_back_with_a_note(source: HyperVSource) -> None:
    vm = source.get_vm("nosvc")
    with source.open_snapshot(vm, Consistency.APP, {}) as snap:
        assert snap.consistency is Consistency.CRASH
        assert "Production checkpoints cannot be created for 'nosvc'" in snap.notes[0]


def test_a_checkpoint_left_by_a_killed_run_is_removed(hv: HyperVLab, source: HyperVSource) -> None:
    vm = source.get_vm("web01")
    host_vm = hv.model.vms["web01"]
    snap_cm = source.open_snapshot(vm, Consistency.CRASH, {})
    snap_cm.__enter__()  # the process "dies" here: its checkpoint stays on the host
    assert len(host_vm.checkpoints) == 1
    with source.open_snapshot(vm, Consistency.CRASH, {}):
        assert len(host_vm.checkpoints) == 1, "the stale one went before the new one was taken"
    assert not host_vm.checkpoints


def test_an_rct_id_the_host_refuses_is_a_compared_full_read(
    hv: HyperVLab, source: HyperVSource
) -> None:
    vm = source.get_vm("web01")
    with source.open_snapshot(vm, Consistency.CRASH, {}) as snap:
        tokens = dict(snap.tokens)
    hv.model.reset_rct("web01", 0)
    hv.model.guest_write("web01", 0, 2 * MiB, b"\x21" * 65536)
    with source.open_snapshot(vm, Consistency.CRASH, tokens) as snap:
        disk = vm.disks[0].name
        assert snap.since[disk] is None and snap.since[vm.disks[1].name] == tokens[vm.disks[1].name]
        assert any("change tracking cannot answer" in n and "32773" in n for n in snap.notes)
        extents = list(source.changed_extents(snap, disk))
        assert sum(e.length for e in extents) >= 2 * MiB, "all allocated blocks are read"
        assert source.read(snap, disk, Extent(2 * MiB, 65536)) == b"\x21" * 65536
    assert not source.token_valid(vm, str(tokens[disk]))


def test_a_disk_on_a_differencing_chain_reads_through_its_parent(
    hv: HyperVLab, source: HyperVSource, tmp_path: Path
) -> None:
    """A VM running on a differencing VHDX (its own checkpoint, or a failback onto a point):
    the frozen file's parent locator is followed over the share, and the bytes are the
    parent's as qemu-img reads them with the child's writes on top."""
    host = hv.model
    vm = host.add_vm("chained", [8])
    base = vm.disks[0].path
    host.guest_write("chained", 0, 0, b"\x0b" * (3 * MiB))
    child = base.with_name("disk0-child.avhdx")
    host.new_vhd_differencing(child, base)
    vm.disks[0].path = child
    host.guest_write("chained", 0, 2 * MiB + 512, b"\xc4" * 4096)
    raw = tmp_path / "base.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "vhdx", "-O", "raw", str(base), str(raw)],
                   check=True)  # fmt: skip
    want = bytearray(raw.read_bytes())
    want[2 * MiB + 512 : 2 * MiB + 4608] = b"\xc4" * 4096
    spec = source.get_vm("chained")
    disk = spec.disks[0].name
    with source.open_snapshot(spec, Consistency.CRASH, {}) as snap:
        extents = list(source.changed_extents(snap, disk))
        assert extents[0].offset == 0 and extents[-1].end >= 3 * MiB, "the parent's data too"
        for e in extents:
            assert bytes(source.read(snap, disk, e)) == bytes(want[e.offset : e.end])
        assert source.read(snap, disk, Extent(0, spec.disks[0].size)) == bytes(want)
    assert not host.vms["chained"].checkpoints
    del host.vms["chained"]
