"""The core's target contract kit against the Azure target (Azurite + fake ARM)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from azure.storage.blob import ContainerClient

from standby.core.config import Site
from standby.core.model import (
    Consistency,
    DiskSpec,
    Extent,
    NicSpec,
    PointInfo,
    ProtectionInfo,
    VMSpec,
)
from standby.core.testing import SourceContract, TargetContract
from standby.providers.azure import vhd
from standby.providers.azure.source import AzureSource
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


@pytest.fixture(scope="module")
def source(azenv: AzureEnv, target: AzureTarget) -> Iterator[AzureSource]:
    """An Azure VM made directly through ARM (as an operator's VM would be): one 16 MiB
    managed disk imported from a page blob, a NIC, Standard_B1s."""
    azenv.make_dr_network()
    c, rg = target.clients, "standby-dr"
    blobs = ContainerClient(
        azenv.azurite.endpoint,
        "kit-src",
        credential={"account_name": azenv.azurite.account, "account_key": azenv.azurite.key},
        connection_verify=str(azenv.cert),
    )
    blobs.create_container()
    size = 16 * MiB
    blob = blobs.get_blob_client("kitsrc.vhd")
    blob.create_page_blob(size + vhd.FOOTER)
    blob.upload_page(vhd.new_footer(size).pack(), offset=size, length=vhd.FOOTER)
    snap = blob.create_snapshot()["snapshot"]
    creation = {
        "createOption": "Import",
        "sourceUri": f"{blob.url}?snapshot={snap}",
        "storageAccountId": target.opts.account_id(),
    }
    disk = c.compute.disks.begin_create_or_update(
        rg, "kitsrc-os", {"location": "westeurope", "properties": {"creationData": creation}}
    ).result()
    subnet = c.network.subnets.get(rg, "dr-vnet", "default")
    ipc = {"name": "ip", "properties": {"subnet": {"id": subnet.id}}}
    nic = c.network.network_interfaces.begin_create_or_update(
        rg, "kitsrc-nic", {"location": "westeurope", "properties": {"ipConfigurations": [ipc]}}
    ).result()
    vm_body = {
        "location": "westeurope",
        "properties": {
            "hardwareProfile": {"vmSize": "Standard_B1s"},
            "storageProfile": {
                "osDisk": {"createOption": "Attach", "osType": "Linux",
                           "managedDisk": {"id": disk.id}},
            },
            "networkProfile": {"networkInterfaces": [{"id": nic.id}]},
        },
    }  # fmt: skip
    c.compute.virtual_machines.begin_create_or_update(rg, "kitsrc", vm_body).result()
    site = Site(name="azure-src", plugin="azure", path=target.site.path, raw=target.site.raw)
    src = AzureSource(site)
    src.connect()
    try:
        yield src
    finally:
        src.close()


@pytest.fixture
def contract_vm() -> str:
    return "kitsrc"


@pytest.fixture
def mutate(azenv: AzureEnv) -> Callable[..., None]:
    """Write into the VM's managed disk as its guest would (the disk's data in Azurite)."""

    def write(vm: str, disk: str, offset: int, length: int, pattern: int) -> None:
        assert (vm, disk) == ("kitsrc", "os")
        azenv.arm.disk_data("kitsrc-os").upload_page(
            bytes([pattern]) * length, offset=offset, length=length
        )

    return write


class TestAzureSource(SourceContract):
    """Source side of the kit: a VM running in Azure, read through disk snapshots + SAS."""


def test_azure_source_snapshots_are_gone_after_a_cycle(
    source: AzureSource, azenv: AzureEnv
) -> None:
    vm = source.get_vm("kitsrc")
    assert [d.name for d in vm.disks] == ["os"] and vm.disks[0].size == 16 * MiB
    assert vm.power_state == "running" and vm.nics and vm.nics[0].network == "default"
    with source.open_snapshot(vm, Consistency.CRASH, {"os": None}) as snap:
        assert azenv.arm.resources("snapshots"), "a cycle reads from a snapshot"
        assert not snap.tokens["os"]
    assert not azenv.arm.resources("snapshots")


def test_page_writes_carry_the_md5_the_service_checks(azenv: AzureEnv) -> None:
    """Azurite ignores Content-MD5 on Put Page; Azure rejects a body that does not match it.

    So the header is checked here, on the wire, for every piece of a write above 4 MiB."""
    import base64
    import hashlib

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
