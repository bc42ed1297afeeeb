"""VMM (System Center Virtual Machine Manager) sites: a cloud as the source or the DR site.

A `plugin = "vmm"` site speaks to the VMM server's PowerShell module over WinRM (the same keys
and TLS pinning as a Hyper-V site) for what VMM knows: the cloud's VMs (`Get-SCVirtualMachine
-Cloud`), its hosts (`Get-SCVMHost`, with the memory VMM says each has free), its VM networks
(`Get-SCVMNetwork`). Disk data never goes through VMM: standby reaches each managed host as a
Hyper-V site of its own (built from this site's keys and its `hosts` table) and the Hyper-V
source and target do the work there. A failed-over VM is then adopted by VMM: refreshed, put
in the target cloud, its NICs connected to the mapped VM networks (`Set-SCVirtualNetworkAdapter
-VMNetwork`). One VMM managing both sites (geo-clustered) is two site files naming the same
server with different clouds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

from pydantic import Field

from standby.core.config import Site
from standby.core.errors import ConfigError, NotFound, PluginError
from standby.core.interfaces import (
    Buffer,
    ReplicaWriter,
    Snapshot,
    Source,
    SourceCapabilities,
    Target,
    TargetCapabilities,
)
from standby.core.model import (
    Consistency,
    DiskSpec,
    Extent,
    FailoverResult,
    Firmware,
    NicSpec,
    PointInfo,
    ProtectionInfo,
    Validation,
    VMSpec,
)

from . import scripts
from .conn import HyperVOptions, PowerShell, as_list
from .inventory import MAX_VHDX, mac
from .source import HyperVSource
from .target import HyperVTarget

VMM_ONLY = ("plugin", "cloud", "hosts", "switch", "test_network", "networks")


class VmmOptions(HyperVOptions):
    """Keys of a `plugin = "vmm"` site file: the VMM server's listener (`host`, `port`, ...)
    plus the cloud and how standby reaches the cloud's hosts."""

    cloud: str | None = None
    """The VMM cloud this site is: the VMs a source lists, where a target places VMs."""
    hosts: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per managed host (by VMM's name for it): keys of a Hyper-V site that differ from this
    file's (`host` address, `port`, `thumbprint`, `share`, `share_root`, `smb_port`...)."""
    switch: str | None = None
    """At a DR cloud: the hosts' virtual switch failed-over VMs' NICs go on (VMM then puts
    them on the mapped VM networks)."""
    test_network: str | None = None
    """At a DR cloud: the VM network drills connect to; unset, drill VMs stay on each host's
    private test switch and on no VM network."""


class _Vmm:
    """What VMM sources and targets share: the VMM connection and a Hyper-V plugin per host."""

    site: Site
    opts: VmmOptions
    ps: PowerShell

    def __init__(self, site: Site) -> None:
        super().__init__(site)  # type: ignore[call-arg]  # Plugin's, next in the MRO
        self.opts = site.options(VmmOptions)
        self.ps = PowerShell(self.opts)
        self._hosts: dict[str, Any] = {}

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return HyperVSource.unavailable_reason()

    def connect(self) -> None:
        self.ps.connect()

    def close(self) -> None:
        self.close_hosts()

    def host_site(self, name: str) -> Site:
        """The managed host `name` as a Hyper-V site: this file's keys, the host's own table
        over them, and `host` defaulting to VMM's name for it."""
        raw = {k: v for k, v in self.site.raw.items() if k not in VMM_ONLY}
        raw["host"] = name
        raw.update(self.opts.hosts.get(name, {}))
        return Site(f"{self.site.name}/{name}", "hyperv", self.site.path, raw)

    def vmm(self, op: str, params: dict[str, Any], body: str) -> Any:
        return self.ps.run(scripts.script(op, params, body))

    def cloud_facts(self) -> dict[str, Any]:
        if not self.opts.cloud:
            raise ConfigError(f"{self.site.path}: key 'cloud' is needed for a VMM DR site")
        return dict(self.vmm("vmm-cloud", {"Cloud": self.opts.cloud}, scripts.VMM_CLOUD) or {})

    def find(self, vm_id: str, name: str) -> dict[str, Any] | None:
        found = self.vmm("vmm-find", {"VMId": vm_id, "Name": name}, scripts.VMM_FIND)
        return dict(found) if found else None

    def close_hosts(self) -> None:
        for plugin in self._hosts.values():
            plugin.close()
        self._hosts.clear()
        self.ps.close()


def vm_spec(raw: dict[str, Any]) -> VMSpec:
    """A VMM VM as a VMSpec: disks named as the host names them (`scsi0-1`)."""
    disks = tuple(
        DiskSpec(
            name=f"{str(d['BusType']).lower()}{d['Bus']}-{d['Lun']}",
            size=int(d["Size"]),
            format="vhdx",
            boot=i == 0,
        )
        for i, d in enumerate(as_list(raw.get("Disks")))
    )
    nics = tuple(
        NicSpec(
            name=str(n.get("Name") or f"nic{i}"),
            mac=mac(str(n["MACAddress"])),
            network=str(n.get("VMNetwork") or ""),
            model="synthetic",
        )
        for i, n in enumerate(as_list(raw.get("Nics")))
    )
    generation = int(raw["Generation"])
    state = str(raw.get("Status", "unknown"))
    return VMSpec(
        id=str(raw["VMId"]),
        name=str(raw["Name"]),
        cpus=int(raw["CPUCount"]),
        memory_mib=int(raw["MemoryMB"]),
        firmware=Firmware.UEFI if generation == 2 else Firmware.BIOS,
        disks=disks,
        nics=nics,
        power_state={"Running": "running", "PowerOff": "shutoff"}.get(state, state.lower()),
        extra={
            "generation": str(generation),
            "vmm.host": str(raw.get("VMHost") or ""),
            "vmm.cloud": str(raw.get("Cloud") or ""),
        },
    )


class VmmSource(_Vmm, Source):
    """The VMs of a VMM cloud; each cycle runs on the host the VM is on now (VMM says which:
    a VM live-migrated inside the cluster is followed, its RCT reset handled as on a host)."""

    plugin_name = "vmm"
    capabilities: ClassVar[SourceCapabilities] = HyperVSource.capabilities

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self._snaps: dict[int, HyperVSource] = {}

    def check(self) -> list[str]:
        vms = self.list_vms()
        where = f"cloud '{self.opts.cloud}'" if self.opts.cloud else "every cloud"
        return [f"connected to VMM {self.ps.what}", f"{len(vms)} VMs to protect in {where}"]

    def list_vms(self) -> list[VMSpec]:
        raw = self.vmm("vmm-vms", {"Cloud": self.opts.cloud}, scripts.VMM_VMS)
        return [vm_spec(v) for v in as_list(raw)]

    def host(self, vm: VMSpec) -> HyperVSource:
        """The Hyper-V source of the host `vm` runs on now."""
        found = self.find(vm.id, vm.name)
        if found is None:
            raise NotFound(f"VM '{vm.name}' not found at VMM site '{self.site.name}'")
        name = str(found["VMHost"])
        if name not in self._hosts:
            src = HyperVSource(self.host_site(name))
            src.connect()
            self._hosts[name] = src
        return self._hosts[name]  # type: ignore[no-any-return]

    @contextmanager
    def open_snapshot(
        self, vm: VMSpec, consistency: Consistency, since: Mapping[str, str | None]
    ) -> Iterator[Snapshot]:
        src = self.host(vm)
        with src.open_snapshot(vm, consistency, since) as snap:
            self._snaps[id(snap)] = src
            try:
                yield snap
            finally:
                del self._snaps[id(snap)]

    def changed_extents(self, snapshot: Snapshot, disk: str) -> Iterator[Extent]:
        return self._snaps[id(snapshot)].changed_extents(snapshot, disk)

    def read(self, snapshot: Snapshot, disk: str, extent: Extent) -> Buffer:
        return self._snaps[id(snapshot)].read(snapshot, disk, extent)

    def read_many(self, snapshot: Snapshot, disk: str, extents: list[Extent]) -> list[Buffer]:
        return self._snaps[id(snapshot)].read_many(snapshot, disk, extents)

    def token_valid(self, vm: VMSpec, token: str) -> bool:
        return self.host(vm).token_valid(vm, token)

    def release_tokens(self, vm: VMSpec, keep: Mapping[str, str | None]) -> None:
        self.host(vm).release_tokens(vm, keep)

    def power_off(self, vm: VMSpec, force: bool = False) -> None:
        self.host(vm).power_off(vm, force)

    def power_on(self, vm: VMSpec) -> None:
        self.host(vm).power_on(vm)


class _HostWriter(ReplicaWriter):
    """A host's replica writer whose points also name the host (where the chain lives)."""

    def __init__(self, inner: ReplicaWriter, host: str) -> None:
        self.inner, self.host = inner, host

    def write(self, disk: str, offset: int, data: Buffer) -> None:
        self.inner.write(disk, offset, data)

    def write_many(self, disk: str, pieces: list[tuple[int, Buffer]]) -> None:
        self.inner.write_many(disk, pieces)

    def write_zeroes(self, disk: str, extent: Extent) -> None:
        self.inner.write_zeroes(disk, extent)

    def read(self, disk: str, extent: Extent) -> Buffer:
        return self.inner.read(disk, extent)

    def flush(self) -> None:
        self.inner.flush()

    def unproven(self, disk: str, written: Any, planned: Any) -> Any:
        return self.inner.unproven(disk, written, planned)

    def commit_point(self, point_id: int, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {**self.inner.commit_point(point_id, meta), "host": self.host}


class VmmTarget(_Vmm, Target):
    """A VMM cloud at the DR site: replicas on the host VMM's figures place them on, failed-over
    VMs adopted into the cloud on the mapped VM networks."""

    plugin_name = "vmm"
    capabilities: ClassVar[TargetCapabilities] = HyperVTarget.capabilities

    def check(self) -> list[str]:
        facts = self.cloud_facts()
        hosts = [str(h["Name"]) for h in as_list(facts.get("Hosts"))]
        nets = [str(n) for n in as_list(facts.get("VMNetworks"))]
        return [
            f"connected to VMM {self.ps.what}",
            f"cloud '{self.opts.cloud}': hosts {', '.join(hosts) or 'none'}",
            f"VM networks: {', '.join(nets) or 'none'}",
        ]

    def host(self, name: str) -> HyperVTarget:
        if name not in self._hosts:
            tgt = HyperVTarget(self.host_site(name))
            tgt.connect()
            self._hosts[name] = tgt
        return self._hosts[name]  # type: ignore[no-any-return]

    def _hosts_of_cloud(self, facts: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        facts = facts or self.cloud_facts()
        return [dict(h) for h in as_list(facts.get("Hosts"))]

    def place(self, pinfo: ProtectionInfo) -> str:
        """The host of a protection's replicas: the one already holding its folder, else the
        cloud's host with the most free memory (VMM's figure) that fits the VM, ties by name."""
        hosts = self._hosts_of_cloud()
        for h in hosts:
            name = str(h["Name"])
            tgt = self.host(name)
            if tgt.share.exists(tgt.vm_dir(pinfo)):
                return name
        fits = [
            h
            for h in hosts
            if int(h.get("AvailableMemoryMB") or 0) >= pinfo.vm.memory_mib
            and str(h.get("State", "OK")) in ("OK", "Ok", "Responding")
        ]
        if not fits:
            raise PluginError(
                f"no host of cloud '{self.opts.cloud}' has {pinfo.vm.memory_mib} MiB free for "
                f"VM '{pinfo.vm.name}'"
            )
        best = sorted(fits, key=lambda h: (-int(h.get("AvailableMemoryMB") or 0), h["Name"]))[0]
        return str(best["Name"])

    def _mapped(self, network: str) -> str:
        return self.opts.networks.get(network) or network

    def validate(self, vm: VMSpec) -> Validation:
        problems: list[str] = []
        facts = self.cloud_facts()
        hosts = self._hosts_of_cloud(facts)
        nets = {str(n) for n in as_list(facts.get("VMNetworks"))}
        if not hosts:
            problems.append(f"cloud '{self.opts.cloud}' has no hosts")
        elif all(int(h.get("AvailableMemoryMB") or 0) < vm.memory_mib for h in hosts):
            problems.append(
                f"no host of cloud '{self.opts.cloud}' has {vm.memory_mib} MiB free for the VM"
            )
        for disk in vm.disks:
            if disk.size > MAX_VHDX:
                problems.append(
                    f"disk {disk.name} is {disk.size >> 30} GiB; a VHDX holds at most "
                    f"{MAX_VHDX >> 40} TiB"
                )
        for nic in vm.nics:
            want = self._mapped(nic.network)
            if want not in nets:
                problems.append(
                    f"NIC {nic.name} is on network '{nic.network}': cloud '{self.opts.cloud}' "
                    f"has no VM network '{want}' (map it under networks)"
                )
        if vm.nics and not self.opts.switch:
            problems.append(f"{self.site.path}: key 'switch' (the hosts' virtual switch) is unset")
        generation = 2 if vm.firmware is Firmware.UEFI else 1
        return Validation(
            problems=problems, size=f"gen{generation}-{vm.cpus}vcpu-{vm.memory_mib}MiB"
        )

    def prepare(self, protection: ProtectionInfo) -> None:
        self.host(self.place(protection)).prepare(protection)

    @contextmanager
    def open_writer(
        self, protection: ProtectionInfo, cycle_id: int, base: PointInfo | None
    ) -> Iterator[ReplicaWriter]:
        name = str(base.ref["host"]) if base and base.ref.get("host") else self.place(protection)
        with self.host(name).open_writer(protection, cycle_id, base) as w:
            yield _HostWriter(w, name)

    def _holding(self, pinfo: ProtectionInfo) -> list[HyperVTarget]:
        out = []
        for h in self._hosts_of_cloud():
            tgt = self.host(str(h["Name"]))
            if tgt.share.exists(tgt.vm_dir(pinfo)):
                out.append(tgt)
        return out

    def discard_pending(self, protection: ProtectionInfo, cycle_id: int) -> None:
        for tgt in self._holding(protection):
            tgt.discard_pending(protection, cycle_id)

    def prune(
        self, protection: ProtectionInfo, drop: list[PointInfo], keep: list[PointInfo]
    ) -> dict[int, dict[str, Any]]:
        moved: dict[int, dict[str, Any]] = {}
        for name in sorted({str(p.ref.get("host")) for p in [*drop, *keep]}):
            mine = [p for p in drop if str(p.ref.get("host")) == name]
            if mine:
                kept = [p for p in keep if str(p.ref.get("host")) == name]
                moved.update(self.host(name).prune(protection, mine, kept))
        return moved

    def failover(
        self,
        protection: ProtectionInfo,
        point: PointInfo,
        *,
        test: bool,
        network: str | None = None,
        size: str | None = None,
        failover_id: int | None = None,
    ) -> FailoverResult:
        name = str(point.ref.get("host") or "")
        if not name:
            raise PluginError(f"point {point.id} does not say which host holds it")
        switch = None if test else (self.opts.switch or network)
        result = self.host(name).failover(
            protection, point, test=test, network=switch, size=size, failover_id=failover_id
        )
        vm_net = self.opts.test_network if test else None
        nics = [
            {
                "Mac": n.mac.upper().replace("-", ":"),
                "VMNetwork": vm_net if test else network or self._mapped(n.network),
            }
            for n in protection.vm.nics
        ]
        self.vmm(
            "vmm-adopt",
            {"VMId": result.ref["vm_id"], "VMHost": name, "Cloud": self.opts.cloud, "Nics": nics},
            scripts.VMM_ADOPT,
        )
        return FailoverResult(
            ref={**result.ref, "host": name},
            vm_name=result.vm_name,
            summary=f"{result.summary}, in VMM cloud '{self.opts.cloud}'",
        )

    def cleanup_test(self, protection: ProtectionInfo, ref: Mapping[str, Any]) -> None:
        if ref.get("host"):
            self.host(str(ref["host"])).cleanup_test(protection, ref)
            return
        for tgt in self._holding(protection):  # a failover that died before saying where
            tgt.cleanup_test(protection, ref)

    def commit_failover(
        self,
        protection: ProtectionInfo,
        ref: Mapping[str, Any],
        point: PointInfo,
        released: list[PointInfo],
    ) -> None:
        self.host(str(point.ref["host"])).commit_failover(protection, ref, point, released)

    def seed(self, protection: ProtectionInfo, original: VMSpec) -> dict[str, Any] | None:
        """The original VM's disks, on whichever host VMM says it is on now."""
        found = self.find(original.id, original.name)
        if found is None:
            return None
        name = str(found["VMHost"])
        ref = self.host(name).seed(protection, original)
        return None if ref is None else {**ref, "host": name}

    def remove(self, protection: ProtectionInfo, points: list[PointInfo]) -> None:
        for tgt in self._holding(protection):
            tgt.remove(protection, points)
