"""A VMM server's state behind a second WinRM double: clouds over managed Hyper-V hosts (the
`HyperVHost` models standby also reaches directly), VM networks, and each VM's cloud and
NIC networks. It answers the `# standby:vmm-*` scripts with what the VMM cmdlets' objects
turn into under ConvertTo-Json, and errors with their texts (`Get-SCCloud` of an unknown
cloud answers nothing, and the next cmdlet fails on the null, as VMM does)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from doubles.hyperv_host import HostError, HyperVHost, convert_to_json, vhdx_size


@dataclass
class Cloud:
    hosts: list[str]
    networks: list[str]
    """VM networks its logical networks carry."""


@dataclass
class VmmServer:
    hosts: dict[str, HyperVHost]
    """VMM's name of each managed host -> its model."""
    clouds: dict[str, Cloud] = field(default_factory=dict)
    host_memory_mb: dict[str, int] = field(default_factory=dict)
    """Each host's memory; VMM's AvailableMemory is this minus what running VMs use."""
    vm_cloud: dict[str, str] = field(default_factory=dict)
    """VMId -> the cloud VMM has it in (default: the cloud of its host)."""
    nic_network: dict[tuple[str, str], str] = field(default_factory=dict)
    """(VMId, MAC as VMM writes it) -> VM network."""

    def handle(self, script: str) -> tuple[str, str, int]:
        m = re.search(r"^# standby:([\w-]+)\n\$p = ConvertFrom-Json '(.*)'$", script, re.M)
        if not m:
            return "", "The term is not recognized by this double.", 1
        op, params = m.group(1), json.loads(m.group(2).replace("''", "'"))
        try:
            out = getattr(self, "op_" + op.replace("-", "_"))(params)
        except HostError as exc:
            return "", str(exc), 1
        return convert_to_json(out if isinstance(out, list) else [out] if out else []), "", 0

    @staticmethod
    def mac(raw: str) -> str:
        """VMM's `00:15:5D:0A:0B:01` from Hyper-V's `00155D0A0B01`."""
        h = raw.replace(":", "").upper()
        return ":".join(h[i : i + 2] for i in range(0, 12, 2))

    def _cloud_of_host(self, host: str) -> str | None:
        return next((c for c, cl in self.clouds.items() if host in cl.hosts), None)

    def _all(self) -> list[tuple[str, Any]]:
        return [(h, vm) for h, model in self.hosts.items() for vm in model.vms.values()]

    def _vm_json(self, host: str, vm: Any) -> dict[str, Any]:
        cloud = self.vm_cloud.get(vm.id) or self._cloud_of_host(host)
        return {
            "VMId": vm.id, "Name": vm.name, "VMHost": host, "Cloud": cloud,
            "Generation": vm.generation, "CPUCount": vm.cpus, "MemoryMB": vm.memory >> 20,
            "Status": "Running" if vm.state == "Running" else "PowerOff",
            "Disks": [
                {"BusType": d.controller, "Bus": d.number, "Lun": d.location,
                 "Location": self.hosts[host].winpath(d.path), "Size": vhdx_size(d.path)}
                for d in vm.disks
            ],
            "Nics": [
                {"Name": n.name, "MACAddress": self.mac(n.mac),
                 "VMNetwork": self.nic_network.get((vm.id, self.mac(n.mac)))}
                for n in vm.nics
            ],
        }  # fmt: skip

    def _cloud(self, name: str) -> Cloud:
        if name not in self.clouds:  # Get-SCCloud answers nothing; the next cmdlet fails
            raise HostError(
                "Get-SCVirtualMachine : Cannot validate argument on parameter 'Cloud'. The "
                "argument is null. (Error ID: 1601)"
            )
        return self.clouds[name]

    def op_vmm_vms(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        want = p.get("Cloud")
        if want:
            self._cloud(want)
        out = []
        for host, vm in self._all():
            if "standby:replica" in vm.notes:
                continue
            item = self._vm_json(host, vm)
            if not want or item["Cloud"] == want:
                out.append(item)
        return out

    def op_vmm_cloud(self, p: dict[str, Any]) -> dict[str, Any]:
        cloud = self._cloud(p["Cloud"])
        hosts = []
        for h in cloud.hosts:
            used = sum(v.memory >> 20 for v in self.hosts[h].vms.values() if v.state == "Running")
            free = self.host_memory_mb.get(h, 65536) - used
            hosts.append({"Name": h, "AvailableMemoryMB": free, "State": "OK"})
        return {"Name": p["Cloud"], "Hosts": hosts, "VMNetworks": list(cloud.networks)}

    def _find(self, vm_id: str, name: str | None = None) -> tuple[str, Any] | None:
        """By VMId first, else by name (not one of standby's own VMs)."""
        for host, vm in self._all():
            if vm.id == vm_id:
                return host, vm
        for host, vm in self._all():
            if name and vm.name == name and "standby:" not in vm.notes:
                return host, vm
        return None

    def op_vmm_find(self, p: dict[str, Any]) -> dict[str, Any] | None:
        found = self._find(p["VMId"], p.get("Name"))
        if found is None:
            return None
        host, vm = found
        return {"VMId": vm.id, "Name": vm.name, "VMHost": host,
                "Status": "Running" if vm.state == "Running" else "PowerOff"}  # fmt: skip

    def op_vmm_adopt(self, p: dict[str, Any]) -> dict[str, Any]:
        found = self._find(p["VMId"])
        if found is None:
            raise HostError(
                "Read-SCVirtualMachine : Cannot validate argument on parameter 'VM'. The "
                "argument is null. (Error ID: 1601)"
            )
        host, vm = found
        if p.get("Cloud"):
            cloud = self._cloud(p["Cloud"])
            if host not in cloud.hosts:
                raise HostError(
                    f"Set-SCVirtualMachine : The host {host} is not part of a host group of "
                    f"cloud {p['Cloud']}. (Error ID: 23807)"
                )
            self.vm_cloud[vm.id] = p["Cloud"]
            for n in p.get("Nics") or []:
                if n.get("VMNetwork"):
                    if n["VMNetwork"] not in cloud.networks:
                        raise HostError(
                            f"Set-SCVirtualNetworkAdapter : VM network {n['VMNetwork']} is not "
                            f"available in cloud {p['Cloud']}. (Error ID: 50608)"
                        )
                    self.nic_network[(vm.id, n["Mac"])] = n["VMNetwork"]
        return {"VMId": vm.id, "Name": vm.name, "Cloud": self.vm_cloud.get(vm.id)}
