"""Protectability against Azure's rules, VM size choice, and failover to Azure VMs."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from standby.core.errors import ConfigError, NotFound, PluginError, TransientError
from standby.core.model import DiskSpec, FailoverResult, Firmware, PointInfo, ProtectionInfo, VMSpec
from standby.providers.azure.conn import AzureClients, AzureOptions, azure_errors, call
from standby.providers.azure.storage import MAX_DISK

GiB = 1 << 30
OS_DISK_MAX = 4095 * GiB
"""Azure's OS disk limit (4 TiB less 1 GiB)."""
DATA_DISK_MAX = 32767 * GiB
MAX_DATA_DISKS = 64
TAG_PROTECTION = "standby-protection"
TAG_FAILOVER = "standby-failover"
TAG_DISK = "standby-disk"
"""On a failed-over managed disk: the source disk it holds (how failback maps it back)."""
TAG_KIND = "standby-kind"


@dataclass(frozen=True)
class VMSize:
    """One entry of the region's VM sizes list."""

    name: str
    cores: int
    memory_mib: int
    max_data_disks: int


POWER = {
    "running": "running",
    "starting": "running",
    "stopping": "shutdown",
    "stopped": "shutoff",
    "deallocating": "shutoff",
    "deallocated": "shutoff",
}
"""Azure PowerState/<code> -> standby's power states (a stopped guest is shut off)."""


def power_state(clients: AzureClients, name: str) -> str:
    """A VM's power state in standby's words: running, shutdown, shutoff or unknown."""
    rg = clients.opts.resource_group
    view = call(
        f"instance view of VM {name}", clients.compute.virtual_machines.instance_view, rg, name
    )
    for status in view.statuses or []:
        code = str(status.code or "")
        if code.startswith("PowerState/"):
            return POWER.get(code.split("/", 1)[1], "unknown")
    return "unknown"


def boot_disk(vm: VMSpec) -> DiskSpec:
    """The disk Azure boots from: the one marked boot, else the first."""
    return next((d for d in vm.disks if d.boot), vm.disks[0])


def generation(vm: VMSpec) -> str:
    """BIOS boots as a Generation 1 VM, UEFI as Generation 2."""
    return "V2" if vm.firmware == Firmware.UEFI else "V1"


def os_type(vm: VMSpec) -> str:
    return "Windows" if "win" in vm.guest_os.lower() else "Linux"


def list_sizes(clients: AzureClients) -> list[VMSize]:
    """The sizes the region offers, as the API returns them."""
    loc = clients.opts.location
    with azure_errors(f"list VM sizes in {loc}"):
        return [
            VMSize(s.name, int(s.number_of_cores), int(s.memory_in_mb), int(s.max_data_disk_count))
            for s in clients.compute.virtual_machine_sizes.list(loc)
        ]


def choose_size(
    vm: VMSpec, sizes: list[VMSize], wanted: str | None, price: Callable[[str], float | None]
) -> tuple[VMSize | None, list[str]]:
    """The given size checked, or the smallest that fits (cheapest among equals)."""
    data_disks = max(0, len(vm.disks) - 1)
    need = f"{vm.cpus} core(s), {vm.memory_mib} MiB and {data_disks} data disk(s)"

    def fits(s: VMSize) -> bool:
        return (
            s.cores >= vm.cpus and s.memory_mib >= vm.memory_mib and s.max_data_disks >= data_disks
        )

    if wanted:
        match = next((s for s in sizes if s.name.lower() == wanted.lower()), None)
        if match is None:
            return None, [f"VM size '{wanted}' is not offered in this region"]
        if not fits(match):
            return None, [
                f"VM size '{match.name}' ({match.cores} cores, {match.memory_mib} MiB, "
                f"{match.max_data_disks} data disks) is too small: the VM needs {need}"
            ]
        return match, []
    fitting = [s for s in sizes if fits(s)]
    if not fitting:
        return None, [f"no VM size in this region has {need}"]
    inf = float("inf")
    best = min(
        fitting, key=lambda s: (s.cores, s.memory_mib, p if (p := price(s.name)) else inf, s.name)
    )
    return best, []


def validate(
    vm: VMSpec, sizes: list[VMSize], wanted: str | None, price: Callable[[str], float | None]
) -> tuple[list[str], str | None, list[str]]:
    """Every reason `vm` cannot run in Azure, the chosen size, and notes."""
    problems: list[str] = []
    notes: list[str] = []
    if not vm.disks:
        return ["the VM has no disks"], None, notes
    boot = boot_disk(vm)
    for d in vm.disks:
        if d.size > MAX_DISK:
            problems.append(
                f"disk '{d.name}' is {d.size / GiB:.1f} GiB; an Azure page blob holds a disk of "
                f"at most {MAX_DISK / GiB:.0f} GiB"
            )
        elif d is boot and d.size > OS_DISK_MAX:
            problems.append(
                f"OS disk '{d.name}' is {d.size / GiB:.1f} GiB; Azure OS disks are at most "
                f"{OS_DISK_MAX // GiB} GiB"
            )
        elif d.size > DATA_DISK_MAX:
            problems.append(f"disk '{d.name}' is above Azure's {DATA_DISK_MAX // GiB} GiB limit")
    if len(vm.disks) - 1 > MAX_DATA_DISKS:
        problems.append(f"{len(vm.disks) - 1} data disks; Azure VMs take at most {MAX_DATA_DISKS}")
    gen = generation(vm)
    notes.append(f"firmware {vm.firmware.value} -> Hyper-V generation {gen}")
    if gen == "V1" and boot.size > 2048 * GiB:
        notes.append(f"OS disk '{boot.name}' is above 2 TiB: an MBR (Gen1) guest sees only 2 TiB")
    size, size_problems = choose_size(vm, sizes, wanted, price)
    problems.extend(size_problems)
    if size is not None:
        notes.append(
            f"failover size {size.name} ({size.cores} cores, {size.memory_mib} MiB, "
            f"up to {size.max_data_disks} data disks)"
        )
    return problems, size.name if size else None, notes


def _safe(name: str, limit: int) -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", name).strip("-")[:limit] or "vm"


class Failover:
    """One failover into Azure: disks from the point's snapshots, NICs, the VM."""

    def __init__(
        self,
        clients: AzureClients,
        protection: ProtectionInfo,
        key: str,
        step: Callable[[str], None],
    ) -> None:
        self.c = clients
        self.o: AzureOptions = clients.opts
        self.p = protection
        self.key = key
        self.step = step
        self.rg = self.o.resource_group
        self.tags = {TAG_PROTECTION: str(protection.id), TAG_FAILOVER: key}

    def _put(self, what: str, begin: Callable[..., Any], name: str, body: Any) -> Any:
        """One create-or-update: start it, then wait for the long-running operation."""
        poller = call(what, begin, self.rg, name, body)
        return self._wait(poller, what)

    def _wait(self, poller: Any, what: str) -> Any:
        result = call(what, poller.result, timeout=self.o.operation_timeout)
        if not poller.done():
            raise TransientError(f"{what}: not finished after {self.o.operation_timeout}s")
        return result

    def network(self, test: bool, override: str | None) -> Any:
        """The subnet NICs go into: the isolated test network (made if missing) or the DR one."""
        net = self.o.test_network if test else self.o.network
        if override:
            vnet, _, subnet = override.partition("/")
            net = type(self.o.test_network)(vnet=vnet, subnet=subnet or "default")
        if net is None:
            raise ConfigError(
                "site has no 'network' for failover (vnet and subnet); set it in "
                "sites/<site>.toml or pass --network VNET/SUBNET"
            )
        nw = self.c.network
        try:
            subnet = call("read subnet", nw.subnets.get, self.rg, net.vnet, net.subnet)
            if test:
                vnet = call("read test network", nw.virtual_networks.get, self.rg, net.vnet)
                peers = [p.name for p in (vnet.virtual_network_peerings or [])]
                if peers:
                    raise ConfigError(
                        f"test network '{net.vnet}' is peered with {', '.join(peers)}: it is not "
                        f"isolated; name an unpeered virtual network in 'test_network'"
                    )
            return subnet
        except NotFound as exc:
            if not test or override:
                raise ConfigError(
                    f"subnet '{net.subnet}' of virtual network '{net.vnet}' does not exist in "
                    f"resource group '{self.rg}'"
                ) from exc
        self.step(f"creating isolated test network {net.vnet}/{net.subnet}")
        body = {
            "location": self.o.location,
            "tags": {"standby-managed": "isolated-test-network"},
            "properties": {
                "addressSpace": {"addressPrefixes": [net.address_prefix]},
                "subnets": [
                    {"name": net.subnet, "properties": {"addressPrefix": net.address_prefix}}
                ],
            },
        }
        self._put(
            f"create virtual network {net.vnet}",
            nw.virtual_networks.begin_create_or_update,
            net.vnet,
            body,
        )
        return call("read subnet", nw.subnets.get, self.rg, net.vnet, net.subnet)

    def run(self, point: PointInfo, test: bool, network: str | None, size: str) -> FailoverResult:
        vm = self.p.vm
        base = _safe(vm.name, 40)
        kind = "test" if test else "fo"
        vm_name = f"{base}-test" if test else base
        self.tags[TAG_KIND] = "test" if test else "failover"
        self.tags["standby-point"] = str(point.id)
        subnet = self.network(test, network)
        boot = boot_disk(vm)
        ordered = [boot, *(d for d in vm.disks if d is not boot)]
        snaps: Mapping[str, str] = point.ref.get("snapshots", {})
        blobs: Mapping[str, str] = point.ref.get("blobs", {})
        missing = [d.name for d in ordered if d.name not in snaps]
        if missing:
            raise PluginError(f"recovery point {point.id} has no snapshot of disk(s) {missing}")
        container_url = self.c.container.url
        self.step(f"importing {len(ordered)} managed disk(s) from recovery point {point.id}")
        disk_ids: list[str] = []
        with ThreadPoolExecutor(max_workers=min(8, len(ordered))) as pool:
            futures = [
                pool.submit(
                    self._disk,
                    f"{base}-{_safe(d.name, 20)}-{kind}{self.key}",
                    f"{container_url}/{blobs[d.name]}?snapshot={snaps[d.name]}",
                    d,
                    d is boot,
                )
                for d in ordered
            ]
            disk_ids = [f.result() for f in futures]
        self.step("creating network interface(s)")
        nics = [
            self._nic(f"{base}-nic{i}-{kind}{self.key}", subnet.id)
            for i in range(max(1, len(vm.nics)))
        ]
        self.step(f"creating VM {vm_name} ({size}) and powering it on")
        self._vm(vm_name, size, disk_ids, [n.id for n in nics])
        ips = [cfg.private_ip_address for n in nics for cfg in (n.ip_configurations or [])]
        where = "isolated test network" if test else "DR network"
        return FailoverResult(
            ref={
                "failover_id": self.key,
                "vm": vm_name,
                "disks": disk_ids,
                "nics": [n.id for n in nics],
                "addresses": ips,
                "size": size,
            },
            vm_name=vm_name,
            summary=(
                f"Azure VM {vm_name} ({size}) running from point {point.id} in the {where} "
                f"({subnet.id.split('/virtualNetworks/')[-1]}), address {', '.join(ips) or '-'}"
            ),
        )

    def _disk(self, name: str, source_uri: str, disk: DiskSpec, boot: bool) -> str:
        existing = self._existing(self.c.compute.disks.get, name)
        if existing is not None:
            return str(existing.id)
        props: dict[str, Any] = {
            "creationData": {
                "createOption": "Import",
                "sourceUri": source_uri,
                "storageAccountId": self.o.account_id(),
            }
        }
        if boot:
            props.update(osType=os_type(self.p.vm), hyperVGeneration=generation(self.p.vm))
        body = {
            "location": self.o.location,
            "tags": {**self.tags, TAG_DISK: disk.name},
            "sku": {"name": self.o.disk_sku},
            "properties": props,
        }
        return str(
            self._put(
                f"import disk {name}", self.c.compute.disks.begin_create_or_update, name, body
            ).id
        )

    def _nic(self, name: str, subnet_id: str) -> Any:
        existing = self._existing(self.c.network.network_interfaces.get, name)
        if existing is not None:
            return existing
        body = {
            "location": self.o.location,
            "tags": self.tags,
            "properties": {
                "ipConfigurations": [
                    {
                        "name": "ipconfig1",
                        "properties": {
                            "subnet": {"id": subnet_id},
                            "privateIPAllocationMethod": "Dynamic",
                        },
                    }
                ]
            },
        }
        return self._put(
            f"create NIC {name}",
            self.c.network.network_interfaces.begin_create_or_update,
            name,
            body,
        )

    def _vm(self, name: str, size: str, disk_ids: list[str], nic_ids: list[str]) -> Any:
        existing = self._existing(self.c.compute.virtual_machines.get, name)
        if existing is not None and existing.provisioning_state == "Succeeded":
            return existing  # made by this failover before it was interrupted
        body = {
            "location": self.o.location,
            "tags": self.tags,
            "properties": {
                "hardwareProfile": {"vmSize": size},
                "storageProfile": {
                    "osDisk": {
                        "createOption": "Attach",
                        "osType": os_type(self.p.vm),
                        "managedDisk": {"id": disk_ids[0]},
                    },
                    "dataDisks": [
                        {"lun": i, "createOption": "Attach", "managedDisk": {"id": d}}
                        for i, d in enumerate(disk_ids[1:])
                    ],
                },
                "networkProfile": {
                    "networkInterfaces": [
                        {"id": n, "properties": {"primary": i == 0}} for i, n in enumerate(nic_ids)
                    ]
                },
            },
        }
        return self._put(
            f"create VM {name}", self.c.compute.virtual_machines.begin_create_or_update, name, body
        )

    def _existing(self, getter: Callable[..., Any], name: str) -> Any:
        try:
            found = call(f"read {name}", getter, self.rg, name)
        except NotFound:
            return None
        if (found.tags or {}).get(TAG_FAILOVER) != self.key:
            raise ConfigError(
                f"Azure resource '{name}' already exists in '{self.rg}' and was not made by "
                f"this failover"
            )
        return found

    def cleanup(self) -> list[str]:
        """Delete every VM, NIC and disk tagged with this failover (VMs first); idempotent."""
        comp, net = self.c.compute, self.c.network

        def mine(items: Any) -> list[Any]:
            return [
                r
                for r in items
                if (r.tags or {}).get(TAG_FAILOVER) == self.key
                and (r.tags or {}).get(TAG_PROTECTION) == str(self.p.id)
            ]

        removed: list[str] = []
        for what, lister, deleter in (
            ("VM", comp.virtual_machines.list, comp.virtual_machines.begin_delete),
            ("NIC", net.network_interfaces.list, net.network_interfaces.begin_delete),
            ("disk", comp.disks.list_by_resource_group, comp.disks.begin_delete),
        ):
            found = mine(call(f"list {what}s", lambda lister=lister: list(lister(self.rg))))
            if found:
                self.step(f"deleting {len(found)} {what}(s)")
            pollers = [
                (r.name, call(f"delete {what} {r.name}", deleter, self.rg, r.name)) for r in found
            ]
            for name, poller in pollers:
                try:
                    self._wait(poller, f"delete {what} {name}")
                except NotFound:
                    pass
                removed.append(f"{what} {name}")
        return removed


def new_key() -> str:
    """A failover key when the engine gave no failover id."""
    return uuid.uuid4().hex[:8]
