"""Where a failed-over VM goes at a vSphere DR site: cluster, pool, host, folder, port groups,
and the ConfigSpec that creates it on standby's flat disks."""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from standby.core.errors import ConfigError, NotFound
from standby.core.model import Firmware, VMSpec

from .conn import FAILOVER_KEY, REPLICA_KEY, VMwareOptions, extra_config, vim_errors, wait_task

ISOLATED_VSWITCH = "standby-isolated"
UNITS_PER_CONTROLLER = 15  # SCSI units 0-15 without 7, the controller's own
MAX_CONTROLLERS = 4
VMWARE_OUI = ("00:50:56", "00:0c:29")


@dataclass
class Placement:
    """The resolved inventory objects of a DR site."""

    cluster: Any
    pool: Any
    host: Any
    folder: Any


def _children(folder: Any, kind: Any) -> list[Any]:
    return [c for c in folder.childEntity if isinstance(c, kind)]


def find_cluster(dc: Any, opts: VMwareOptions, site: str) -> Any:
    from pyVmomi import vim

    clusters = _children(dc.hostFolder, vim.ComputeResource)
    if opts.cluster is None:
        if not clusters:
            raise NotFound(f"site '{site}': datacenter '{opts.datacenter}' has no cluster or host")
        return clusters[0]
    for c in clusters:
        if c.name == opts.cluster:
            return c
    names = ", ".join(sorted(c.name for c in clusters)) or "none"
    raise NotFound(f"site '{site}': cluster '{opts.cluster}' not found (there: {names})")


def find_pool(cluster: Any, opts: VMwareOptions, site: str) -> Any:
    root = cluster.resourcePool
    if not opts.resource_pool:
        return root
    todo = [root]
    while todo:
        pool = todo.pop()
        if pool.name == opts.resource_pool:
            return pool
        todo.extend(pool.resourcePool or ())
    raise NotFound(
        f"site '{site}': resource pool '{opts.resource_pool}' not found in cluster '{cluster.name}'"
    )


def find_folder(dc: Any, opts: VMwareOptions, create: bool, site: str) -> Any | None:
    """The VM folder failovers go to (`folder`, a path under the datacenter's VM folder);
    made when `create`, else None when missing."""
    from pyVmomi import vim

    folder = dc.vmFolder
    for part in [p for p in (opts.folder or "").split("/") if p]:
        found = [c for c in _children(folder, vim.Folder) if c.name == part]
        if found:
            folder = found[0]
        elif create:
            with vim_errors(f"site '{site}': folder '{opts.folder}'"):
                folder = folder.CreateFolder(part)
        else:
            return None
    return folder


def pick_host(cluster: Any, site: str) -> Any:
    hosts = [
        h
        for h in cluster.host
        if str(h.runtime.connectionState) == "connected" and not h.runtime.inMaintenanceMode
    ]
    if not hosts:
        raise NotFound(f"site '{site}': cluster '{cluster.name}' has no connected host")
    return hosts[0]


def networks_by_name(dc: Any) -> dict[str, Any]:
    return {n.name: n for n in dc.network}


def port_group_for(opts: VMwareOptions, network: str, override: str | None) -> str:
    return override or opts.networks.get(network) or network


def isolated_network(dc: Any, cluster: Any, opts: VMwareOptions, site: str) -> Any:
    """The test port group: on a vSwitch with no uplink on every host of the cluster (made on
    first use, so a test VM reaches nothing outside its host)."""
    from pyVmomi import vim

    name = opts.test_network
    for host in cluster.host:
        with vim_errors(f"site '{site}': isolated network on {host.name}"):
            ns = host.configManager.networkSystem
            info = ns.networkInfo
            if not any(v.name == ISOLATED_VSWITCH for v in info.vswitch or ()):
                ns.AddVirtualSwitch(
                    vswitchName=ISOLATED_VSWITCH,
                    spec=vim.host.VirtualSwitch.Specification(numPorts=128),
                )
            if not any(p.spec.name == name for p in info.portgroup or ()):
                spec = vim.host.PortGroup.Specification(
                    name=name,
                    vswitchName=ISOLATED_VSWITCH,
                    vlanId=0,
                    policy=vim.host.NetworkPolicy(),
                )
                with suppress(vim.fault.DuplicateName):  # there already (vcsim: on another host)
                    ns.AddPortGroup(portgrp=spec)
    found = networks_by_name(dc).get(name)
    if found is None:
        raise NotFound(f"site '{site}': test port group '{name}' did not appear")
    return found


def nic_backing(net: Any) -> Any:
    from pyVmomi import vim

    if isinstance(net, vim.dvs.DistributedVirtualPortgroup):
        return vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
            port=vim.dvs.PortConnection(
                portgroupKey=net.key,
                switchUuid=net.config.distributedVirtualSwitch.uuid,  # type: ignore[union-attr]
            )
        )
    return vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=net.name, network=net)


def disk_slot(index: int) -> tuple[int, int, int]:
    """(controller index, unit number, device key) of the `index`-th disk, as vSphere keys
    SCSI disks: 2000 + 16 * bus + unit."""
    bus, n = divmod(index, UNITS_PER_CONTROLLER)
    unit = n if n < 7 else n + 1
    return bus, unit, 2000 + 16 * bus + unit


def parse_size(size: str | None, vm: VMSpec) -> tuple[int, int]:
    """`Nvcpu-MMiB` (the size chosen at validation) -> (cpus, memory MiB)."""
    if not size:
        return vm.cpus, vm.memory_mib
    try:
        cpu, mem = size.split("-", 1)
        return int(cpu.removesuffix("vcpu")), int(mem.removesuffix("MiB"))
    except ValueError:
        raise ConfigError(f"size '{size}' is not like '2vcpu-4096MiB'") from None


def guest_id(vm: VMSpec) -> str:
    if vm.extra.get("guest_id"):
        return vm.extra["guest_id"]
    text = vm.guest_os.lower()
    if "windows" in text:
        return "windows9Server64Guest"
    return "other3xLinux64Guest" if "linux" in text or text == "unknown" else "otherGuest64"


def config_spec(
    vm: VMSpec,
    name: str,
    vm_dir: str,
    disk_files: list[tuple[str, int]],
    nets: list[Any],
    *,
    size: tuple[int, int],
    tags: dict[str, str],
    keep_macs: bool,
) -> Any:
    """The ConfigSpec of a new VM on existing flat disks (`[ds] path.vmdk`, bytes)."""
    from pyVmomi import vim

    changes = []
    buses = {disk_slot(i)[0] for i in range(len(disk_files))}
    for bus in sorted(buses):
        ctl = vim.vm.device.ParaVirtualSCSIController(
            key=1000 + bus, busNumber=bus, sharedBus="noSharing"
        )
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=ctl))
    for i, (path, nbytes) in enumerate(disk_files):
        bus, unit, key = disk_slot(i)
        disk = vim.vm.device.VirtualDisk(
            key=key,
            controllerKey=1000 + bus,
            unitNumber=unit,
            capacityInKB=nbytes // 1024,
            capacityInBytes=nbytes,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=path, diskMode="persistent", thinProvisioned=True
            ),
        )
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=disk))
    for i, (nic, net) in enumerate(zip(vm.nics, nets, strict=True)):
        card = vim.vm.device.VirtualVmxnet3(key=4000 + i, backing=nic_backing(net))
        if keep_macs and nic.mac.lower().startswith(VMWARE_OUI):
            card.addressType, card.macAddress = "manual", nic.mac
        else:
            card.addressType = "generated"
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=card))
    hw = vm.extra.get("hw_version", "")
    return vim.vm.ConfigSpec(
        name=name,
        numCPUs=size[0],
        memoryMB=size[1],
        guestId=guest_id(vm),
        firmware="efi" if vm.firmware is Firmware.UEFI else "bios",
        version=f"vmx-{int(hw):02d}" if hw.isdigit() and int(hw) >= 7 else "vmx-13",
        files=vim.vm.FileInfo(vmPathName=vm_dir),
        deviceChange=changes,
        extraConfig=[vim.option.OptionValue(key=k, value=v) for k, v in tags.items()],
    )


def created_by(cfg: Any, failover_id: int) -> bool:
    """Whether failover `failover_id` created this VM."""
    return extra_config(cfg).get(FAILOVER_KEY) == str(failover_id)


def swapped_by(cfg: Any, failover_id: int) -> bool:
    """Whether failover `failover_id` (a failback) switched this original VM's disks."""
    return extra_config(cfg).get(FAILOVER_KEY) == f"{failover_id}:original"


def is_replica(cfg: Any) -> bool:
    return REPLICA_KEY in extra_config(cfg)


def power_on(vm: Any, what: str, timeout: float) -> None:
    with vim_errors(what):
        if str(vm.runtime.powerState) == "poweredOn":
            return
        task = vm.PowerOnVM_Task()
    wait_task(task, what, timeout)


def destroy(vm: Any, what: str, timeout: float) -> None:
    """Power a VM off and delete it with its files."""
    with vim_errors(what):
        if str(vm.runtime.powerState) != "poweredOff":
            wait_task(vm.PowerOffVM_Task(), what, timeout)
        task = vm.Destroy_Task()
    wait_task(task, what, timeout)
