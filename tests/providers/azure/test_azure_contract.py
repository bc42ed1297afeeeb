"""The core's target contract kit against the Azure target (Azurite + fake ARM)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from standby.core.config import Site
from standby.core.model import DiskSpec, Extent, NicSpec, PointInfo, ProtectionInfo, VMSpec
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


def test_page_writes_carry_the_md5_the_service_checks(azenv: AzureEnv) -> None:
    """Azurite ignores Content-MD5 on Put Page; Azure rejects a body that does not match it.

    So the header is checked here, on the wire, for every piece of a write above 4 MiB."""
    import base64
    import hashlib

    from azure.storage.blob import ContainerClient

    from standby.providers.azure.storage import PageBlobDisk

    sent: list[tuple[str, str | None, str]] = []

    def hook(request: Any) -> None:
        req = request.http_request
        if (
            req.method == "PUT"
            and "comp=page" in req.url
            and req.headers.get("x-ms-page-write") == "update"
        ):
            body = bytes(req.data or b"")
            digest = base64.b64encode(hashlib.md5(body).digest()).decode()
            sent.append((req.headers.get("x-ms-range", ""), req.headers.get("Content-MD5"), digest))

    cc = ContainerClient(
        azenv.azurite.endpoint,
        "md5check",
        credential={"account_name": azenv.azurite.account, "account_key": azenv.azurite.key},
        connection_verify=str(azenv.cert),
        raw_request_hook=hook,
    )
    cc.create_container()
    disk = PageBlobDisk(cc, "d.vhd", DiskSpec(name="vda", size=16 << 20))
    disk.ensure()
    sent.clear()
    data = bytes(range(256)) * (6 << 12)  # 6 MiB: two Put Page calls
    disk.write(1 << 20, data)
    assert [s[0] for s in sent] == [
        f"bytes={1 << 20}-{(5 << 20) - 1}",
        f"bytes={5 << 20}-{(7 << 20) - 1}",
    ]
    assert all(md5 == body for _, md5, body in sent), "every Put Page carries its body's MD5"
    assert disk.read(Extent(1 << 20, len(data))) == data
