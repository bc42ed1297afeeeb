"""A Hyper-V host's state behind the WinRM double: VMs, their VHDX disks (real files made by
`qemu-img create -f vhdx`) and NICs, answering the plugin's scripts as the host would.

This is not a PowerShell interpreter: it recognises the scripts standby sends (by the cmdlets
in them) and answers with the JSON `ConvertTo-Json` would write for the same objects (one
object bare, several as an array), and errors with the cmdlets' own texts.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Disk:
    path: Path
    controller: str = "SCSI"
    number: int = 0
    location: int = 0


@dataclass
class Nic:
    name: str
    mac: str  # Hyper-V's form: 00155D0A0B0C
    switch: str


@dataclass
class VM:
    name: str
    generation: int = 2
    cpus: int = 2
    memory: int = 2 << 30
    state: str = "Running"
    notes: str = ""
    disks: list[Disk] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


def vhdx_size(path: Path) -> int:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "-f", "vhdx", "--output=json", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(json.loads(out.stdout)["virtual-size"])


def convert_to_json(items: list[Any]) -> str:
    """ConvertTo-Json of a pipeline: nothing, one object bare, or an array."""
    if not items:
        return ""
    return json.dumps(items[0] if len(items) == 1 else items)


@dataclass
class HyperVHost:
    """The model; `handle` is the WinRM double's handler."""

    root: Path
    vms: dict[str, VM] = field(default_factory=dict)

    def add_vm(self, name: str, disks_mib: list[int], generation: int = 2, **kw: Any) -> VM:
        vm = VM(name=name, generation=generation, **kw)
        for i, mib in enumerate(disks_mib):
            path = self.root / name / f"disk{i}.vhdx"
            path.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", str(path), f"{mib}M"],
                           check=True)  # fmt: skip
            ide = generation == 1 and i < 2  # generation 1 boots from IDE
            vm.disks.append(Disk(path, "IDE" if ide else "SCSI", 0, i))
        self.vms[name] = vm
        return vm

    def handle(self, script: str) -> tuple[str, str, int]:
        if "Get-VMHardDiskDrive" in script and "Get-VMNetworkAdapter" in script:
            return convert_to_json([self._inventory(vm) for vm in self._listed()]), "", 0
        m = re.search(r"Get-VM\s+-Name\s+'([^']*)'", script)
        if m and m.group(1) not in self.vms:
            return (
                "",
                (
                    f"Get-VM : Hyper-V was unable to find a virtual machine with name "
                    f'"{m.group(1)}".'
                ),
                1,
            )
        return "", f"The term '{script.split()[0]}' is not recognized by this double.", 1

    def _listed(self) -> list[VM]:
        return [vm for vm in self.vms.values() if "standby:replica" not in vm.notes]

    def _inventory(self, vm: VM) -> dict[str, Any]:
        return {
            "Id": vm.id,
            "Name": vm.name,
            "Generation": vm.generation,
            "ProcessorCount": vm.cpus,
            "MemoryStartup": vm.memory,
            "State": vm.state,
            "Disks": [
                {
                    "ControllerType": d.controller,
                    "ControllerNumber": d.number,
                    "ControllerLocation": d.location,
                    "Path": str(d.path),
                    "Size": vhdx_size(d.path),
                }
                for d in vm.disks
            ],
            "Nics": [
                {"Name": n.name, "MacAddress": n.mac, "SwitchName": n.switch} for n in vm.nics
            ],
        }
