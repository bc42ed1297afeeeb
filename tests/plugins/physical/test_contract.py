"""The core's contract kit, run against the physical (libvirt) source and target."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from standby.core.config import Site
from standby.core.model import DiskSpec, NicSpec, PointInfo, ProtectionInfo, VMSpec
from standby.core.testing import SourceContract, TargetContract
from standby.plugins.physical import lab
from standby.plugins.physical.source import PhysicalSource
from standby.plugins.physical.target import PhysicalTarget
from support.labenv import Lab, MiB


@pytest.fixture(scope="module")
def source(labenv: Lab) -> Iterator[PhysicalSource]:
    site = Site(
        name="src",
        plugin="physical",
        path=labenv.home / "sites/src.toml",
        raw={"uri": labenv.src_uri},
    )
    src = PhysicalSource(site)
    src.connect()
    lab.create_vm(src.conn, "contract1", labenv.base / "disks", [("vda", 16 * MiB, "qcow2")])
    try:
        yield src
    finally:
        lab.destroy_vm(src.conn, "contract1")
        src.close()


@pytest.fixture
def contract_vm() -> str:
    return "contract1"


@pytest.fixture
def mutate(source: PhysicalSource) -> Callable[..., None]:
    def write(vm: str, disk: str, offset: int, length: int, byte: int) -> None:
        lab.guest_write(source.conn, vm, disk, offset, length, byte)

    return write


class TestPhysicalSource(SourceContract):
    """Source side of the kit."""


@pytest.fixture(scope="module")
def target(labenv: Lab) -> Iterator[PhysicalTarget]:
    site = Site(
        name="dr",
        plugin="physical",
        path=labenv.home / "sites/dr.toml",
        raw={"uri": labenv.dr_uri, "pool_dir": str(labenv.base / "kitpool"), "domain_type": "qemu"},
    )
    tgt = PhysicalTarget(site)
    tgt.connect()
    try:
        yield tgt
    finally:
        tgt.close()


@pytest.fixture
def contract_protection() -> ProtectionInfo:
    vm = VMSpec(
        id="kit-1",
        name="kitvm",
        cpus=1,
        memory_mib=64,
        disks=(DiskSpec(name="vda", size=8 * MiB, format="qcow2"),),
        nics=(NicSpec(name="nic0", mac="52:54:00:00:00:99"),),
    )
    return ProtectionInfo(id=42, vm=vm, source_site="src", target_site="dr")


@pytest.fixture
def read_point() -> Callable[..., bytes]:
    def read(p: ProtectionInfo, point: PointInfo, disk: str, offset: int, length: int) -> bytes:
        path = Path(point.ref["files"][disk])
        assert path.exists()
        return lab.read_range(path, offset, length)

    return read


class TestPhysicalTarget(TargetContract):
    """Target side of the kit."""

    def test_points_are_files_nobody_writes(
        self, target: PhysicalTarget, contract_protection: ProtectionInfo
    ) -> None:
        p = contract_protection
        target.prepare(p)
        with target.open_writer(p, 1, None) as w:
            w.write("vda", 0, b"\x05" * 65536)
            ref = w.commit_point(1)
        path = Path(ref["files"]["vda"])
        before = path.stat().st_mtime_ns
        point = PointInfo(
            id=1, created_at=__import__("datetime").datetime.now(), ref=ref, disks={"vda": 8 * MiB}
        )
        with target.open_writer(p, 2, point) as w:
            w.write("vda", 0, b"\x06" * 65536)
            w.commit_point(2)
        assert path.stat().st_mtime_ns == before
        info = subprocess.run(
            ["qemu-img", "info", "-U", str(target.cycle_file(p, "vda", 2))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert str(path) in info  # the new point is an overlay on the old one
        target.remove(p, [])


def test_uefi_is_offered_only_where_the_host_has_firmware() -> None:
    from standby.plugins.physical.domxml import firmware_kinds

    with_ovmf = "<domainCapabilities><os supported='yes'><enum name='firmware'><value>efi</value></enum></os></domainCapabilities>"  # noqa: E501
    without = (
        "<domainCapabilities><os supported='yes'><enum name='firmware'/></os></domainCapabilities>"
    )
    assert firmware_kinds(with_ovmf) == {"efi"}
    assert firmware_kinds(without) == set()
