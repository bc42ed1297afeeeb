"""The core's contract kits on VMM sites (the VMM double over two Hyper-V host doubles): a
cloud as a source and a cloud as a DR site."""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from doubles.vmm import Cloud

from standby.core.config import Site
from standby.core.model import DiskSpec, PointInfo, ProtectionInfo, VMSpec
from standby.core.testing import SourceContract, TargetContract
from standby.plugins.hyperv.vmm import VmmSource, VmmTarget
from support.hyperv import VmmLab, start_hyperv, start_vmm

MiB = 1 << 20


@pytest.fixture(scope="module")
def vmm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmmLab]:
    a = start_hyperv(tmp_path_factory.mktemp("ka"), env_prefix="STANDBY_TEST_KA")
    b = start_hyperv(tmp_path_factory.mktemp("kb"), env_prefix="STANDBY_TEST_KB")
    clouds = {"Gold": Cloud(["a.lab"], ["Prod"]), "DR": Cloud(["b.lab"], ["DR-Prod"])}
    server = start_vmm(tmp_path_factory.mktemp("kvmm"), {"a.lab": a, "b.lab": b}, clouds)
    a.model.add_vm("kit01", [16])
    try:
        yield server
    finally:
        server.stop()
        a.stop()
        b.stop()


def _site(vmm: VmmLab, home: Path, name: str, cloud: str) -> Site:
    vmm.write_site(home, name, cloud, switch="LAN")
    raw = tomllib.loads((home / "sites" / f"{name}.toml").read_text())
    raw.pop("plugin")
    return Site(name, "vmm", home / "sites" / f"{name}.toml", raw)


@pytest.fixture(scope="module")
def source(vmm: VmmLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmmSource]:
    src = VmmSource(_site(vmm, tmp_path_factory.mktemp("home"), "gold", "Gold"))
    src.connect()
    try:
        yield src
    finally:
        src.close()


@pytest.fixture(scope="module")
def target(vmm: VmmLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmmTarget]:
    tgt = VmmTarget(_site(vmm, tmp_path_factory.mktemp("home"), "dr", "DR"))
    tgt.connect()
    try:
        yield tgt
    finally:
        tgt.close()


@pytest.fixture(scope="module")
def contract_vm() -> str:
    return "kit01"


@pytest.fixture
def mutate(vmm: VmmLab) -> Callable[..., None]:
    def write(vm: str, disk: str, offset: int, length: int, byte: int) -> None:
        model = vmm.hosts["a.lab"].model
        index = next(i for i, d in enumerate(model.vms[vm].disks) if d.name == disk)
        model.guest_write(vm, index, offset, bytes([byte]) * length)

    return write


@pytest.fixture
def contract_protection() -> ProtectionInfo:
    vm = VMSpec(id="kit-vmm", name="kitvm", cpus=1, memory_mib=64,
                disks=(DiskSpec(name="scsi0-0", size=8 * MiB),))  # fmt: skip
    return ProtectionInfo(id=43, vm=vm, source_site="gold", target_site="dr")


@pytest.fixture
def read_point(vmm: VmmLab) -> object:
    def read(p: ProtectionInfo, point: PointInfo, disk: str, offset: int, length: int) -> bytes:
        return vmm.hosts[str(point.ref["host"])].chain_bytes(
            point.ref["files"][disk], offset, length
        )

    return read


class TestVmmSource(SourceContract):
    """Source side of the kit, on cloud Gold."""


class TestVmmTarget(TargetContract):
    """Target side of the kit, on cloud DR (points name the host VMM placed them on)."""
