"""The core's target contract kit against the Azure target (Azurite + fake ARM)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from standby.core.config import Site
from standby.core.model import DiskSpec, NicSpec, PointInfo, ProtectionInfo, VMSpec
from standby.core.testing import TargetContract
from standby.providers.azure.target import AzureTarget
from support.azure import AzureEnv

MiB = 1 << 20


@pytest.fixture(scope="module")
def target(azenv: AzureEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureTarget]:
    home = tmp_path_factory.mktemp("home")
    site = Site(
        name="azure-dr", plugin="azure", path=home / "azure-dr.toml", raw=azenv.site_raw("kit")
    )
    tgt = AzureTarget(site)
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
        memory_mib=512,
        disks=(DiskSpec(name="vda", size=8 * MiB + 4096, format="qcow2"),),
        nics=(NicSpec(name="nic0", mac="52:54:00:00:00:99"),),
    )
    return ProtectionInfo(id=41, vm=vm, source_site="src", target_site="azure-dr")


@pytest.fixture
def read_point(target: AzureTarget) -> Callable[..., bytes]:
    def read(p: ProtectionInfo, point: PointInfo, disk: str, offset: int, length: int) -> bytes:
        return target.read_point(p, point, disk, offset, length)

    return read


class TestAzureTarget(TargetContract):
    """Target side of the kit, against Azurite and the fake ARM."""
