"""Tests of the fake ARM double, driven by the real Azure SDK clients (and Azurite)."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
)
from azure.core.polling import LROPoller
from azure.identity import ClientSecretCredential
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute import models as cm
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.network import models as nm
from azure.storage.blob import BlobClient, BlobServiceClient, ContainerClient

from doubles.azure_arm import FakeArm
from doubles.azurite_proc import Azurite, start_azurite
from doubles.certs import make_cert

SUB = "00000000-0000-0000-0000-00000000beef"
RG = "standby-dr"
LOC = "westeurope"
PROVIDERS = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers"
STORAGE_ID = f"{PROVIDERS}/Microsoft.Storage/storageAccounts/devstoreaccount1"
FOOTER = b"conectix" + bytes(504)


class StaticToken:
    """A credential that always hands out the same bearer token."""

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        """Return a token valid for an hour."""
        return AccessToken("static-token", int(time.time()) + 3600)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding cert.pem/key.pem shared by Azurite and the fake."""
    directory = tmp_path_factory.mktemp("tls")
    make_cert(directory)
    return directory


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory, tls: Path) -> Iterator[Azurite]:
    """Azurite over HTTPS with the shared certificate."""
    az = start_azurite(tmp_path_factory.mktemp("azurite"), tls / "cert.pem", tls / "key.pem")
    try:
        yield az
    finally:
        az.stop()


@pytest.fixture(scope="module")
def arm_server(azurite: Azurite, tls: Path) -> Iterator[FakeArm]:
    """One fake ARM for the module."""
    with FakeArm(azurite.account, azurite.key, azurite.cert, tls) as arm:
        yield arm


@pytest.fixture
def arm(arm_server: FakeArm) -> FakeArm:
    """The fake, reset for each test."""
    arm_server.reset()
    return arm_server


def _kwargs(arm: FakeArm) -> dict[str, Any]:
    return {"base_url": arm.url, "connection_verify": str(arm.cert), "polling_interval": 0}


@pytest.fixture
def compute(arm: FakeArm) -> ComputeManagementClient:
    """Real compute client pointed at the fake."""
    return ComputeManagementClient(StaticToken(), SUB, **_kwargs(arm))


@pytest.fixture
def network(arm: FakeArm) -> NetworkManagementClient:
    """Real network client pointed at the fake."""
    return NetworkManagementClient(StaticToken(), SUB, **_kwargs(arm))


@pytest.fixture(scope="module")
def container(azurite: Azurite) -> ContainerClient:
    """A blob container in Azurite."""
    service = BlobServiceClient(
        azurite.endpoint,
        credential={"account_name": azurite.account, "account_key": azurite.key},
        connection_verify=str(azurite.cert),
    )
    return service.create_container("vhds")


def _upload(container: ContainerClient, name: str, footer: bytes = FOOTER) -> str:
    """Upload a 4 KiB fixed VHD page blob, snapshot it, return the snapshot URL."""
    data = bytes(range(256)) * 16 + footer
    blob = container.get_blob_client(name)
    blob.create_page_blob(len(data))
    blob.upload_page(data, offset=0, length=len(data))
    snapshot = blob.create_snapshot()["snapshot"]
    return f"{blob.url}?snapshot={snapshot}"


def _import(
    compute: ComputeManagementClient, name: str, uri: str, account: str = STORAGE_ID
) -> cm.Disk:
    source = cm.CreationData(create_option="Import", source_uri=uri, storage_account_id=account)
    props = cm.DiskProperties(os_type="Linux", hyper_v_generation="V2", creation_data=source)
    disk = cm.Disk(location=LOC, tags={"standby": "yes"}, properties=props)
    return compute.disks.begin_create_or_update(RG, name, disk).result()


def _subnet(network: NetworkManagementClient) -> str:
    """Create VNet ``vnet`` with subnets ``default`` (inline) and ``extra``; return default id."""
    default = nm.Subnet(
        name="default", properties=nm.SubnetPropertiesFormat(address_prefix="10.1.0.0/24")
    )
    space = nm.AddressSpace(address_prefixes=["10.1.0.0/16"])
    props = nm.VirtualNetworkPropertiesFormat(address_space=space, subnets=[default])
    vnet = nm.VirtualNetwork(location=LOC, properties=props)
    network.virtual_networks.begin_create_or_update(RG, "vnet", vnet).result()
    extra = nm.Subnet(properties=nm.SubnetPropertiesFormat(address_prefix="10.1.1.0/24"))
    network.subnets.begin_create_or_update(RG, "vnet", "extra", extra).result()
    return _id(network.subnets.get(RG, "vnet", "default"))


def _id(resource: Any) -> str:
    assert isinstance(resource.id, str)
    return resource.id


def _nic_body(subnet_id: str) -> nm.NetworkInterface:
    ipc = nm.NetworkInterfaceIPConfigurationPropertiesFormat(subnet=nm.Subnet(id=subnet_id))
    config = nm.NetworkInterfaceIPConfiguration(name="ipconfig1", properties=ipc)
    props = nm.NetworkInterfacePropertiesFormat(ip_configurations=[config])
    return nm.NetworkInterface(location=LOC, properties=props)


def _nic(network: NetworkManagementClient, name: str, subnet_id: str) -> nm.NetworkInterface:
    call = network.network_interfaces.begin_create_or_update
    return call(RG, name, _nic_body(subnet_id)).result()


def _ip(nic: nm.NetworkInterface) -> str | None:
    assert nic.properties and nic.properties.ip_configurations
    ipc = nic.properties.ip_configurations[0].properties
    return ipc.private_ip_address if ipc else None


def _vm(
    compute: ComputeManagementClient, name: str, size: str, os_disk: str, nic: str,
    data: tuple[str, ...] = (),
) -> cm.VirtualMachine:  # fmt: skip
    attach = cm.DiskCreateOptionTypes.ATTACH
    storage = cm.StorageProfile(
        os_disk=cm.OSDisk(
            create_option=attach, os_type="Linux", managed_disk=cm.ManagedDiskParameters(id=os_disk)
        ),
        data_disks=[
            cm.DataDisk(lun=i, create_option=attach, managed_disk=cm.ManagedDiskParameters(id=d))
            for i, d in enumerate(data)
        ],
    )
    ref = cm.NetworkInterfaceReference(
        id=nic, properties=cm.NetworkInterfaceReferenceProperties(primary=True)
    )
    props = cm.VirtualMachineProperties(
        hardware_profile=cm.HardwareProfile(vm_size=size),
        storage_profile=storage,
        network_profile=cm.NetworkProfile(network_interfaces=[ref]),
    )
    vm = cm.VirtualMachine(location=LOC, tags={"standby": "yes"}, properties=props)
    return compute.virtual_machines.begin_create_or_update(RG, name, vm).result()


def _disk_state(compute: ComputeManagementClient, name: str) -> str | None:
    props = compute.disks.get(RG, name).properties
    return props.disk_state if props else None


def _power(compute: ComputeManagementClient, name: str) -> list[str | None]:
    view = compute.virtual_machines.instance_view(RG, name)
    return [s.code for s in view.statuses or []]


def _error(call: Callable[..., Any], *args: Any) -> tuple[int | None, str | None]:
    """Status and ARM error code of a failing SDK call (LRO results are awaited)."""
    with pytest.raises(HttpResponseError) as err:
        result = call(*args)
        if isinstance(result, LROPoller):
            result.result()
    return err.value.status_code, err.value.error.code if err.value.error else None


def test_full_lifecycle(
    arm: FakeArm, compute: ComputeManagementClient, network: NetworkManagementClient,
    container: ContainerClient,
) -> None:  # fmt: skip
    sizes = {s.name: s for s in compute.virtual_machine_sizes.list(LOC)}
    assert sizes["Standard_D4s_v5"].number_of_cores == 4
    assert sizes["Standard_B1s"].max_data_disk_count == 2
    subnet = _subnet(network)
    vnet = network.virtual_networks.get(RG, "vnet").properties
    assert vnet and [s.name for s in vnet.subnets or []] == ["default", "extra"]

    disk = _import(compute, "os-disk", _upload(container, "lifecycle.vhd"))
    assert _id(disk) == f"{PROVIDERS}/Microsoft.Compute/disks/os-disk"
    assert disk.tags == {"standby": "yes"} and disk.properties
    props = disk.properties
    assert (props.provisioning_state, props.disk_state, props.disk_size_gb) == (
        "Succeeded", "Unattached", 1)  # fmt: skip
    assert (props.hyper_v_generation, props.os_type) == ("V2", "Linux")

    nic = _nic(network, "nic-1", subnet)
    assert _ip(nic) == "10.1.0.4"
    assert _ip(_nic(network, "nic-2", subnet)) == "10.1.0.5"

    vm = _vm(compute, "vm-1", "Standard_D2s_v5", _id(disk), _id(nic))
    assert vm.properties and vm.properties.provisioning_state == "Succeeded"
    assert _disk_state(compute, "os-disk") == "Attached"
    nic_props = network.network_interfaces.get(RG, "nic-1").properties
    assert nic_props and nic_props.virtual_machine and nic_props.virtual_machine.id == vm.id
    expanded = compute.virtual_machines.get(RG, "vm-1", expand="instanceView").properties
    assert expanded and expanded.instance_view and expanded.instance_view.statuses
    assert "PowerState/running" in [s.code for s in expanded.instance_view.statuses]
    assert _power(compute, "vm-1") == ["ProvisioningState/succeeded", "PowerState/running"]

    compute.virtual_machines.begin_power_off(RG, "vm-1").result()
    assert _power(compute, "vm-1")[1] == "PowerState/stopped"
    compute.virtual_machines.begin_deallocate(RG, "vm-1").result()
    assert _disk_state(compute, "os-disk") == "Reserved"
    compute.virtual_machines.begin_start(RG, "vm-1").result()
    assert _power(compute, "vm-1")[1] == "PowerState/running"
    assert [v.name for v in compute.virtual_machines.list(RG)] == ["vm-1"]

    compute.virtual_machines.begin_delete(RG, "vm-1").result()
    assert _disk_state(compute, "os-disk") == "Unattached"
    network.network_interfaces.begin_delete(RG, "nic-1").result()
    network.network_interfaces.begin_delete(RG, "nic-2").result()
    compute.disks.begin_delete(RG, "os-disk").result()
    network.virtual_networks.begin_delete(RG, "vnet").result()
    assert all(not arm.resources(kind) for kind in ("disks", "vms", "nics", "vnets"))
    assert _error(compute.disks.get, RG, "os-disk") == (404, "ResourceNotFound")
    assert ("DELETE", f"{PROVIDERS}/Microsoft.Compute/disks/os-disk", 202) in arm.requests


@pytest.mark.parametrize(
    ("source", "code"),
    [
        ("missing", "BlobNotFound"),
        ("badfooter", "InvalidVhd"),
        ("blockblob", "InvalidVhd"),
        ("otheraccount", "InvalidParameter"),
    ],
)
def test_import_rejects_bad_sources(
    compute: ComputeManagementClient, container: ContainerClient, source: str, code: str
) -> None:
    if source == "missing":
        uri = f"{container.url}/nope.vhd"
    elif source == "badfooter":
        uri = _upload(container, "bad.vhd", footer=b"notavhd!" + bytes(504))
    elif source == "blockblob":
        blob = container.get_blob_client("block.vhd")
        blob.upload_blob(bytes(4096) + FOOTER, overwrite=True)
        uri = blob.url
    else:
        uri = _upload(container, "other.vhd")
        other = STORAGE_ID.replace("devstoreaccount1", "someoneelse")
        assert _error(_import, compute, "d", uri, other) == (400, code)
        return
    assert _error(_import, compute, "d", uri) == (400, code)


def test_allocation_failure_leaves_failed_vm(
    arm: FakeArm, compute: ComputeManagementClient, network: NetworkManagementClient,
    container: ContainerClient,
) -> None:  # fmt: skip
    disk = _id(_import(compute, "os", _upload(container, "alloc.vhd")))
    nic = _id(_nic(network, "nic", _subnet(network)))
    arm.inject("vm.create", code="AllocationFailed", message="No capacity")
    assert _error(_vm, compute, "vm", "Standard_E8s_v5", disk, nic) == (200, "AllocationFailed")
    assert arm.resources("vms")["vm"]["properties"]["provisioningState"] == "Failed"
    assert _power(compute, "vm")[0] == "ProvisioningState/failed/AllocationFailed"
    assert _disk_state(compute, "os") != "Unattached"  # still held by the failed VM
    compute.virtual_machines.begin_delete(RG, "vm").result()
    assert _disk_state(compute, "os") == "Unattached"
    _vm(compute, "vm", "Standard_E8s_v5", disk, nic)
    assert _power(compute, "vm") == ["ProvisioningState/succeeded", "PowerState/running"]


def test_throttling_is_retried_by_the_sdk(arm: FakeArm, compute: ComputeManagementClient) -> None:
    arm.inject("sizes.list", status=429, times=2)
    assert len(list(compute.virtual_machine_sizes.list(LOC))) == 12
    statuses = [s for _, p, s in arm.requests if p.endswith("/vmSizes")]
    assert statuses == [429, 429, 200]


def test_immediate_faults_and_slow_operations(
    arm: FakeArm, compute: ComputeManagementClient, container: ContainerClient
) -> None:
    uri = _upload(container, "slow.vhd")
    arm.inject("disk.create", code="QuotaExceeded")
    assert _error(_import, compute, "d", uri) == (409, "QuotaExceeded")
    arm.slow("disk.create", 0.3)
    started = time.monotonic()
    _import(compute, "d", uri)
    assert time.monotonic() - started >= 0.3
    assert _disk_state(compute, "d") == "Unattached"


def test_conflicts_and_validation(
    arm: FakeArm, compute: ComputeManagementClient, network: NetworkManagementClient,
    container: ContainerClient,
) -> None:  # fmt: skip
    subnet = _subnet(network)
    disks = [_id(_import(compute, f"d{i}", _upload(container, f"c{i}.vhd"))) for i in range(4)]
    nic = _id(_nic(network, "nic", subnet))
    ghost = f"{PROVIDERS}/Microsoft.Network/networkInterfaces/ghost"
    assert _error(_vm, compute, "v", "Standard_Z9", disks[0], nic) == (400, "InvalidParameter")
    too_many = (compute, "v", "Standard_B1s", disks[0], nic, tuple(disks[1:]))
    assert _error(_vm, *too_many) == (409, "OperationNotAllowed")
    assert _error(_vm, compute, "v", "Standard_B1s", disks[0], ghost)[1] == (
        "InvalidResourceReference")  # fmt: skip
    _vm(compute, "v", "Standard_B2s", disks[0], nic, (disks[1],))
    assert _error(_vm, compute, "w", "Standard_B2s", disks[1], nic) == (409, "OperationNotAllowed")
    assert _error(compute.disks.begin_delete, RG, "d0") == (409, "OperationNotAllowed")
    assert _error(network.network_interfaces.begin_delete, RG, "nic") == (400, "NicInUse")
    assert _error(network.virtual_networks.begin_delete, RG, "vnet") == (
        400, "InUseSubnetCannotBeDeleted")  # fmt: skip
    put_nic = network.network_interfaces.begin_create_or_update
    assert _error(put_nic, RG, "n2", _nic_body(subnet + "x")) == (400, "InvalidResourceReference")
    assert _error(compute.disks.get, "no-such-rg", "d0") == (404, "ResourceGroupNotFound")
    assert compute.disks.begin_delete(RG, "never-existed").result() is None


def test_requests_need_a_bearer_token(arm: FakeArm) -> None:
    url = f"{arm.url}/subscriptions/{SUB}/providers/Microsoft.Compute/locations/{LOC}/vmSizes"
    context = ssl.create_default_context(cafile=str(arm.cert))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url + "?api-version=2024-03-01", context=context)
    assert err.value.code == 401
    assert json.loads(err.value.read())["error"]["code"] == "AuthenticationFailed"


def test_token_from_fake_aad(arm: FakeArm) -> None:
    arm.add_app("tenant-1", "client-1", "s3cret")
    options: dict[str, Any] = {"authority": arm.url, "disable_instance_discovery": True}
    options["connection_verify"] = str(arm.cert)
    credential = ClientSecretCredential("tenant-1", "client-1", "s3cret", **options)
    client = ComputeManagementClient(credential, SUB, **_kwargs(arm))
    assert len(list(client.virtual_machine_sizes.list(LOC))) == 12
    assert arm.issued_tokens and arm.issued_tokens[-1] in arm.seen_tokens
    wrong = ClientSecretCredential("tenant-1", "client-1", "wrong", **options)
    with pytest.raises(ClientAuthenticationError, match="AADSTS7000215"):
        wrong.get_token("https://management.azure.com/.default")


def test_standalone_main(tmp_path: Path, azurite: Azurite) -> None:
    script = Path(__file__).with_name("azure_arm.py")
    args = [sys.executable, str(script), "--port", "0", "--dir", str(tmp_path)]
    args += ["--blob-account", azurite.account, "--blob-key", azurite.key]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        word, url, cert = proc.stdout.readline().split()
        assert word == "ready" and url.startswith("https://127.0.0.1:")
        client = ComputeManagementClient(StaticToken(), SUB, base_url=url, connection_verify=cert)
        assert len(list(client.virtual_machine_sizes.list(LOC))) == 12
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


def test_azurite_http_persistence(tmp_path: Path) -> None:
    az = start_azurite(tmp_path / "run1", persist_dir=tmp_path / "data")
    try:
        assert az.endpoint.startswith("http://127.0.0.1:")
        BlobServiceClient.from_connection_string(az.connection_string).create_container("kept")
    finally:
        az.stop()
    again = start_azurite(tmp_path / "run2", persist_dir=tmp_path / "data")
    try:
        service = BlobServiceClient.from_connection_string(again.connection_string)
        assert [c.name for c in service.list_containers()] == ["kept"]
    finally:
        again.kill()
    assert again.proc.returncode is not None


def test_snapshots_and_read_access(
    arm: FakeArm, compute: ComputeManagementClient, network: NetworkManagementClient,
    container: ContainerClient,
) -> None:  # fmt: skip
    """A managed disk keeps the imported data; snapshots of it are read through a SAS that
    ``beginGetAccess`` grants; Azure's rules on exporting attached disks and deleting a
    snapshot with an active SAS hold."""
    disk = _import(compute, "data-disk", _upload(container, "snapsrc.vhd"))
    vm = _vm(
        compute, "vm-s", "Standard_B1s", _id(disk), _id(_nic(network, "nic-s", _subnet(network)))
    )
    assert vm.properties
    grant = cm.GrantAccessData(access="Read", duration_in_seconds=600)
    # a disk attached to a running VM cannot be exported; a snapshot of it can
    assert _error(compute.disks.begin_grant_access, RG, "data-disk", grant) == (
        409, "OperationNotAllowed")  # fmt: skip
    arm.disk_data("data-disk").upload_page(b"\x5a" * 512, offset=512, length=512)  # the guest
    source = cm.CreationData(create_option="Copy", source_resource_id=_id(disk))
    snap = cm.Snapshot(location=LOC, properties=cm.SnapshotProperties(creation_data=source))
    made = compute.snapshots.begin_create_or_update(RG, "snap-1", snap).result()
    assert made.properties and made.properties.disk_size_bytes == 4096
    arm.disk_data("data-disk").upload_page(b"\x11" * 512, offset=512, length=512)  # after it
    sas = compute.snapshots.begin_grant_access(RG, "snap-1", grant).result().access_sas
    assert sas and "sig=" in sas
    reader = BlobClient.from_blob_url(sas, connection_verify=str(arm.blob_ca))
    data = reader.download_blob().readall()
    assert data[:512] == bytes(range(256)) * 2 and data[512:1024] == b"\x5a" * 512
    assert data[-512:].startswith(b"conectix")  # the VHD footer comes with the export
    assert _error(compute.snapshots.begin_delete, RG, "snap-1") == (409, "OperationNotAllowed")
    compute.snapshots.begin_revoke_access(RG, "snap-1").result()
    compute.snapshots.begin_delete(RG, "snap-1").result()
    assert not arm.resources("snapshots")
    with pytest.raises(HttpResponseError):
        reader.download_blob().readall()  # the snapshot's data is gone with it
