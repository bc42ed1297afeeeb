"""Hyper-V inventory: VMs with generation, CPUs, memory, disks (size from Get-VHD) and NICs,
in one round trip. VMs standby made (replicas, test VMs: `standby:` in their notes) are not
listed, nor Hyper-V Replica's replica VMs while they are off, nor its test VMs."""

from __future__ import annotations

from typing import Any

from standby.core.model import DiskSpec, Firmware, NicSpec, VMSpec

from .conn import PowerShell, as_list

REPLICA_MARK = "standby:replica"
"""In the Notes of VMs standby creates: never listed as VMs to protect."""
MAX_VHDX = 64 << 40  # 64 TB: the VHDX format's limit

INVENTORY = r"""
Get-VM | Where-Object {
  $_.Notes -notlike '*standby:replica*' -and $_.ReplicationMode -ne 'TestReplica' -and
  -not ($_.ReplicationMode -eq 'Replica' -and $_.State -eq 'Off') } | ForEach-Object {
  $vm = $_
  [pscustomobject]@{
    Id = $vm.VMId.Guid; Name = $vm.Name; Generation = $vm.Generation
    ProcessorCount = $vm.ProcessorCount; MemoryStartup = $vm.MemoryStartup
    State = $vm.State.ToString()
    Disks = @(Get-VMHardDiskDrive -VM $vm | ForEach-Object {
      [pscustomobject]@{
        ControllerType = $_.ControllerType.ToString(); ControllerNumber = $_.ControllerNumber
        ControllerLocation = $_.ControllerLocation; Path = $_.Path
        Size = (Get-VHD -Path $_.Path).Size
      } })
    Nics = @(Get-VMNetworkAdapter -VM $vm | ForEach-Object {
      [pscustomobject]@{ Name = $_.Name; MacAddress = $_.MacAddress; SwitchName = $_.SwitchName }
    })
  }
}
""".strip()


def disk_name(d: dict[str, Any]) -> str:
    """A disk's stable name from where it is attached: `scsi0-1`, `ide1-0`."""
    kind = str(d.get("ControllerType", "SCSI")).lower()
    return f"{kind}{d.get('ControllerNumber', 0)}-{d.get('ControllerLocation', 0)}"


def mac(raw: str) -> str:
    """Hyper-V's `00155D010203` as `00:15:5d:01:02:03`."""
    hexed = raw.replace(":", "").replace("-", "").lower()
    return ":".join(hexed[i : i + 2] for i in range(0, len(hexed), 2))


def spec(vm: dict[str, Any]) -> VMSpec:
    disks = tuple(
        DiskSpec(name=disk_name(d), size=int(d["Size"]), format="vhdx", boot=i == 0)
        for i, d in enumerate(as_list(vm.get("Disks")))
    )
    nics = tuple(
        NicSpec(
            name=str(n["Name"]),
            mac=mac(str(n["MacAddress"])),
            network=str(n.get("SwitchName") or ""),
            model="synthetic",
        )
        for n in as_list(vm.get("Nics"))
    )
    extra = {
        f"{d.name}.path": str(raw["Path"])
        for d, raw in zip(disks, as_list(vm.get("Disks")), strict=True)
    }
    extra["generation"] = str(vm["Generation"])
    state = str(vm.get("State", "unknown"))
    return VMSpec(
        id=str(vm["Id"]),
        name=str(vm["Name"]),
        cpus=int(vm["ProcessorCount"]),
        memory_mib=int(vm["MemoryStartup"]) >> 20,
        firmware=Firmware.UEFI if int(vm["Generation"]) == 2 else Firmware.BIOS,
        disks=disks,
        nics=nics,
        guest_os="unknown",
        power_state={"Running": "running", "Off": "shutoff"}.get(state, state.lower()),
        extra=extra,
    )


def list_vms(ps: PowerShell) -> list[VMSpec]:
    return [spec(vm) for vm in as_list(ps.run(INVENTORY))]
