"""The PowerShell standby sends to a Hyper-V host, one script per round trip.

Every script starts with `# standby:<op>` (a comment to PowerShell; it names the script in
logs and to the test double) and takes its parameters from one JSON literal
(`$p = ConvertFrom-Json '...'`), so nothing standby interpolates is ever parsed as code.
"""

from __future__ import annotations

import json
from typing import Any

VIRTDISK = r"""
if (-not ('Standby.VirtDisk' -as [type])) {
Add-Type -Namespace Standby -Name VirtDisk -MemberDefinition @'
[StructLayout(LayoutKind.Sequential)] public struct StorageType { public uint DeviceId; public Guid VendorId; }
[StructLayout(LayoutKind.Sequential)] public struct OpenParams { public uint Version; public uint RWDepth; public int GetInfoOnly; public int ReadOnly; public Guid ResiliencyGuid; }
[DllImport("virtdisk.dll", CharSet = CharSet.Unicode)] public static extern uint OpenVirtualDisk(ref StorageType t, string path, uint mask, uint flags, ref OpenParams p, out IntPtr h);
[DllImport("virtdisk.dll")] public static extern uint GetVirtualDiskInformation(IntPtr h, ref uint size, byte[] info, out uint used);
[DllImport("kernel32.dll")] public static extern bool CloseHandle(IntPtr h);
public static string MostRecentId(string path) {
  var t = new StorageType(); var p = new OpenParams(); p.Version = 2; p.GetInfoOnly = 1; IntPtr h;
  uint rc = OpenVirtualDisk(ref t, path, 0, 0, ref p, out h);
  if (rc != 0) { throw new System.ComponentModel.Win32Exception((int)rc); }
  try {
    byte[] info = new byte[16 + 1024]; uint size = (uint)info.Length, used;
    System.BitConverter.GetBytes((uint)15).CopyTo(info, 0);  // GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE
    rc = GetVirtualDiskInformation(h, ref size, info, out used);
    if (rc != 0) { throw new System.ComponentModel.Win32Exception((int)rc); }
    if (System.BitConverter.ToInt32(info, 8) == 0) { return ""; }  // change tracking off
    string id = System.Text.Encoding.Unicode.GetString(info, 16, info.Length - 16);
    return id.Substring(0, id.IndexOf('\0'));  // MostRecentId, NUL-terminated
  } finally { CloseHandle(h); }
}
'@
}
""".strip()
"""`[Standby.VirtDisk]::MostRecentId(path)`: the disk's current Resilient Change Tracking id
(virtdisk's GetVirtualDiskInformation, CHANGE_TRACKING_STATE); "" when RCT is off."""

CHANGES = r"""
function Get-StandbyChanges($ims, $path, $since, $size) {
  $offsets = [System.Collections.Generic.List[UInt64]]::new()
  $lengths = [System.Collections.Generic.List[UInt64]]::new()
  $at = [UInt64]0
  while ($at -lt $size) {
    $r = Invoke-CimMethod -InputObject $ims -MethodName GetVirtualDiskChanges -Arguments @{
      Path = $path; LimitId = $since; ByteOffset = $at; ByteLength = [UInt64]($size - $at) }
    if ($r.ReturnValue -ne 0) {
      throw "GetVirtualDiskChanges : the change tracking id '$since' is not valid for $path (return value $($r.ReturnValue))"
    }
    if ($r.ChangedByteOffsets) { $offsets.AddRange([UInt64[]]$r.ChangedByteOffsets); $lengths.AddRange([UInt64[]]$r.ChangedByteLengths) }
    if ($r.ProcessedByteLength -eq 0) { break }
    $at += $r.ProcessedByteLength
  }
  [pscustomobject]@{ Offsets = $offsets.ToArray(); Lengths = $lengths.ToArray() }
}
""".strip()


def script(op: str, params: dict[str, Any], body: str) -> str:
    """`body` with its marker and its parameters as `$p`."""
    literal = json.dumps(params, separators=(",", ":")).replace("'", "''")
    return f"# standby:{op}\n$p = ConvertFrom-Json '{literal}'\n{body.strip()}"


CHECKPOINT = (
    VIRTDISK
    + "\n"
    + CHANGES
    + "\n"
    + r"""
$vm = Get-VM -Id $p.VMId
Get-VMSnapshot -VM $vm | Where-Object { $_.Name -like "$($p.Prefix)*" } | Remove-VMSnapshot
$notes = @(); $kind = 'Standard'; $prev = $vm.CheckpointType; $cp = $null
try {
  if ($p.App) {
    Set-VM -VM $vm -CheckpointType ProductionOnly
    try { $cp = Checkpoint-VM -VM $vm -SnapshotName $p.Name -Passthru; $kind = 'Production' }
    catch { $notes += "production checkpoint failed ($($_.Exception.Message)): crash-consistent point" }
  }
  if (-not $cp) {
    Set-VM -VM $vm -CheckpointType Standard
    $cp = Checkpoint-VM -VM $vm -SnapshotName $p.Name -Passthru
  }
} finally { Set-VM -VM $vm -CheckpointType $prev }
$ims = Get-CimInstance -Namespace root\virtualization\v2 -ClassName Msvm_ImageManagementService
[pscustomobject]@{
  Id = $cp.Id.Guid; Name = $cp.Name; Kind = $kind; Notes = $notes
  Disks = @(Get-VMHardDiskDrive -VMSnapshot $cp | ForEach-Object {
    $key = "$($_.ControllerType)$($_.ControllerNumber)-$($_.ControllerLocation)".ToLower()
    $vhd = Get-VHD -Path $_.Path
    $since = $p.Since.$key; $changes = $null; $err = $null
    if ($since) {
      try { $changes = Get-StandbyChanges $ims $_.Path $since $vhd.Size }
      catch { $err = $_.Exception.Message }
    }
    [pscustomobject]@{
      Name = $key; Path = $_.Path; Size = $vhd.Size; ParentPath = $vhd.ParentPath
      Rct = [Standby.VirtDisk]::MostRecentId($_.Path); Changes = $changes; ChangeError = $err
    } })
}
"""
)
"""Remove stale cycle checkpoints, take one (production when asked, else standard), and for
each of its disks: the frozen file, its RCT id and the changes since `Since.<disk>`."""

REMOVE_CHECKPOINT = r"""
Get-VMSnapshot -VM (Get-VM -Id $p.VMId) | Where-Object { $_.Name -like "$($p.Prefix)*" } |
  Remove-VMSnapshot
"""
"""Remove the cycle's checkpoint (and any other standby left): Hyper-V merges it."""

RCT_STATE = (
    VIRTDISK
    + "\n"
    + r"""
Get-VMHardDiskDrive -VM (Get-VM -Id $p.VMId) | ForEach-Object {
  [pscustomobject]@{
    Name = "$($_.ControllerType)$($_.ControllerNumber)-$($_.ControllerLocation)".ToLower()
    Rct = [Standby.VirtDisk]::MostRecentId($_.Path) } }
"""
)
"""Each disk's current RCT id (a token stays usable while its tracking identity holds)."""

POWER = r"""
$vm = Get-VM -Id $p.VMId
switch ($p.Action) {
  'start' { if ($vm.State -ne 'Running') { Start-VM -VM $vm } }
  'shutdown' { if ($vm.State -eq 'Running') { Stop-VM -VM $vm -Force -AsJob | Out-Null } }
  'off' { if ($vm.State -ne 'Off') { Stop-VM -VM $vm -TurnOff -Force } }
}
"""
"""Start, ask the guest to shut down (without waiting), or turn off."""

# ---------------------------------------------------------------- the DR side

SWITCHES = r"""
Get-VMSwitch | ForEach-Object { [pscustomobject]@{ Name = $_.Name; SwitchType = $_.SwitchType.ToString() } }
"""
"""The host's virtual switches (to check a protection's network mapping)."""

FAILOVER = r"""
$mark = "standby:failover=$($p.FailoverId);"
$vm = Get-VM | Where-Object { $_.Notes -like "*$mark*" } | Select-Object -First 1
$made = $false
if (-not $vm -and $p.Original) {
  $vm = Get-VM -Id $p.Original
  if ($vm.State -ne 'Off') {
    throw "Start-VM : the original VM '$($vm.Name)' is $($vm.State); shut it down before failing back"
  }
}
if (-not $vm) {
  if ($p.TestSwitch -and -not (Get-VMSwitch | Where-Object { $_.Name -eq $p.TestSwitch })) {
    New-VMSwitch -Name $p.TestSwitch -SwitchType Private | Out-Null
  }
  $vm = New-VM -Name $p.Name -Generation $p.Generation -MemoryStartupBytes $p.Memory -Path $p.Dir -NoVHD
  $made = $true
}
try {
  if ($made) {
    Set-VM -VM $vm -ProcessorCount $p.Cpus -Notes "$($p.Notes) $mark"
    Get-VMNetworkAdapter -VM $vm | Remove-VMNetworkAdapter
    foreach ($n in $p.Nics) {
      Add-VMNetworkAdapter -VM $vm -Name $n.Name -SwitchName $n.Switch -StaticMacAddress $n.Mac
    }
    if ($p.Generation -eq 1 -and ($p.Disks | Where-Object { $_.Type -eq 'SCSI' })) {
      Add-VMScsiController -VM $vm
    }
  }
  foreach ($d in $p.Disks) {
    if (-not (Test-Path -LiteralPath $d.Path)) {
      New-VHD -Path $d.Path -ParentPath $d.Parent -Differencing | Out-Null
    }
    $drive = Get-VMHardDiskDrive -VM $vm -ControllerType $d.Type -ControllerNumber $d.Number -ControllerLocation $d.Location
    if ($drive) { Set-VMHardDiskDrive -VMHardDiskDrive $drive -Path $d.Path }
    else { Add-VMHardDiskDrive -VM $vm -ControllerType $d.Type -ControllerNumber $d.Number -ControllerLocation $d.Location -Path $d.Path }
  }
  if ($vm.State -ne 'Running') { Start-VM -VM $vm }
} catch {
  if ($made) { Remove-VM -VM $vm -Force }
  throw
}
$vm = Get-VM -Id $vm.VMId
[pscustomobject]@{ Id = $vm.VMId.Guid; Name = $vm.Name; State = $vm.State.ToString()
  Disks = @(Get-VMHardDiskDrive -VM $vm | ForEach-Object { $_.Path }) }
"""
"""Start a VM on fresh differencing disks over a point: a new one (named, generation kept,
NICs with their MACs on the mapped switches, or on a private test switch made when missing),
or the original VM, shut down, with its disks swapped (a failback). A VM made by the same
failover before an interruption (`standby:failover=<id>;` in its notes) is reused."""

REMOVE_VM = r"""
Get-VM | Where-Object { $_.Notes -like "*standby:failover=$($p.FailoverId);*" -or
  ($p.TestName -and $_.Name -eq $p.TestName -and $_.Notes -like '*standby:replica*') } | ForEach-Object {
  if ($_.State -ne 'Off') { Stop-VM -VM $_ -TurnOff -Force }
  Remove-VM -VM $_ -Force
}
"""
"""Remove what a failover made (VMs carrying its mark, or standby's test VM of that name:
never an original VM)."""

VM_DISKS = r"""
$all = @(Get-VM)
$vm = $all | Where-Object { $_.VMId.Guid -eq $p.VMId } | Select-Object -First 1
if (-not $vm) {
  $vm = $all | Where-Object { $_.Name -eq $p.Name -and $_.Notes -notlike '*standby:*' } |
    Select-Object -First 1
}
if ($vm) {
  [pscustomobject]@{ Id = $vm.VMId.Guid; Name = $vm.Name; State = $vm.State.ToString()
    Disks = @(Get-VMHardDiskDrive -VM $vm | ForEach-Object {
      [pscustomobject]@{
        Name = "$($_.ControllerType)$($_.ControllerNumber)-$($_.ControllerLocation)".ToLower()
        Path = $_.Path } }) }
}
"""
"""The original VM of a re-protection (by id, else by name), its state and disk files."""

# ---------------------------------------------------------------- VMM (virtualmachinemanager)

VMM_VMS = r"""
$vms = if ($p.Cloud) { Get-SCVirtualMachine -Cloud (Get-SCCloud -Name $p.Cloud) } else { Get-SCVirtualMachine }
$vms | Where-Object { $_.Description -notlike '*standby:replica*' } | ForEach-Object {
  [pscustomobject]@{
    VMId = $_.VMId; Name = $_.Name; VMHost = $_.VMHost.Name; Cloud = $_.Cloud.Name
    Generation = $_.Generation; CPUCount = $_.CPUCount; MemoryMB = $_.Memory
    Status = $_.Status.ToString()
    Disks = @($_.VirtualDiskDrives | ForEach-Object {
      [pscustomobject]@{ BusType = $_.BusType.ToString(); Bus = $_.Bus; Lun = $_.Lun
        Location = $_.VirtualHardDisk.Location; Size = $_.VirtualHardDisk.MaximumSize } })
    Nics = @($_.VirtualNetworkAdapters | ForEach-Object {
      [pscustomobject]@{ Name = $_.Name; MACAddress = $_.MACAddress; VMNetwork = $_.VMNetwork.Name } })
  } }
"""
"""The VMs of a VMM cloud (or of every cloud), as the hosts name their disks (bus type, bus,
LUN = Hyper-V's controller type, number, location), with each VM's current host."""

VMM_CLOUD = r"""
$cloud = Get-SCCloud -Name $p.Cloud
$logical = @($cloud.LogicalNetworks | ForEach-Object { $_.Name })
[pscustomobject]@{
  Name = $cloud.Name
  Hosts = @(Get-SCVMHost -VMHostGroup $cloud.HostGroup | ForEach-Object {
    [pscustomobject]@{ Name = $_.Name; AvailableMemoryMB = $_.AvailableMemory
      State = $_.OverallState.ToString() } })
  VMNetworks = @(Get-SCVMNetwork | Where-Object { $logical -contains $_.LogicalNetwork.Name } |
    ForEach-Object { $_.Name })
}
"""
"""A cloud's hosts (with the memory VMM says each has free) and the VM networks its logical
networks carry: what placement and network mapping are checked against."""

VMM_ADOPT = r"""
$vm = Get-SCVirtualMachine | Where-Object { $_.VMId -eq $p.VMId } | Select-Object -First 1
if (-not $vm) {
  Read-SCVMHost -VMHost (Get-SCVMHost -ComputerName $p.VMHost) | Out-Null
  $vm = Get-SCVirtualMachine | Where-Object { $_.VMId -eq $p.VMId } | Select-Object -First 1
}
Read-SCVirtualMachine -VM $vm | Out-Null
if ($p.Cloud) { Set-SCVirtualMachine -VM $vm -Cloud (Get-SCCloud -Name $p.Cloud) | Out-Null }
foreach ($n in $p.Nics) {
  $nic = $vm.VirtualNetworkAdapters | Where-Object { $_.MACAddress -eq $n.Mac }
  if ($n.VMNetwork) {
    Set-SCVirtualNetworkAdapter -VirtualNetworkAdapter $nic -VMNetwork (Get-SCVMNetwork -Name $n.VMNetwork) | Out-Null
  }
}
[pscustomobject]@{ VMId = $vm.VMId; Name = $vm.Name; Cloud = $vm.Cloud.Name }
"""
"""After the host started a failed-over VM: VMM refreshes it, puts it in the target cloud and
connects its NICs to the mapped VM networks."""

VMM_FIND = r"""
$all = @(Get-SCVirtualMachine)
$vm = $all | Where-Object { $_.VMId -eq $p.VMId } | Select-Object -First 1
if (-not $vm) {
  $vm = $all | Where-Object { $_.Name -eq $p.Name -and $_.Description -notlike '*standby:*' } |
    Select-Object -First 1
}
if ($vm) {
  [pscustomobject]@{ VMId = $vm.VMId; Name = $vm.Name; VMHost = $vm.VMHost.Name; Status = $vm.Status.ToString() }
}
"""
"""One VM by its Hyper-V id (else by name): where it runs now."""

# ---------------------------------------------------------------- Hyper-V Replica (native mode)

REPLICA_SERVER = r"""
Get-VMReplicationServer | ForEach-Object {
  [pscustomobject]@{ ReplicationEnabled = $_.ReplicationEnabled
    AllowedAuthenticationType = $_.AllowedAuthenticationType.ToString() } }
"""
"""Whether this host accepts replication (Set-VMReplicationServer was run on it)."""

REPLICA_ENABLE = r"""
$vm = Get-VM -Id $p.VMId
try {
  if (-not (Get-VMReplication -VM $vm -ErrorAction SilentlyContinue)) {
    $a = @{ VM = $vm; ReplicaServerName = $p.Server; ReplicaServerPort = $p.Port
      AuthenticationType = $p.Auth; RecoveryHistory = $p.History
      ReplicationFrequencySec = $p.Frequency; CompressionEnabled = $true }
    if ($p.Thumbprint) { $a.CertificateThumbprint = $p.Thumbprint }
    Enable-VMReplication @a
  }
  if ((Get-VMReplication -VM $vm).State -eq 'ReadyForInitialReplication') {
    Start-VMInitialReplication -VM $vm
  }
} catch {
  Remove-VMReplication -VM $vm -ErrorAction SilentlyContinue
  throw
}
Get-VMReplication -VM $vm | ForEach-Object { [pscustomobject]@{ State = $_.State.ToString(); Health = $_.Health.ToString() } }
"""
"""Primary side: Enable-VMReplication towards the DR host and the initial replication; undone
if either fails."""

REPLICA_STATE = r"""
$vm = Get-VM -Id $p.VMId
if ($p.Final) { Start-VMFailover -Prepare -VM $vm -Confirm:$false }
Get-VMReplication -VM $vm | ForEach-Object {
  [pscustomobject]@{ State = $_.State.ToString(); Health = $_.Health.ToString()
    Mode = $_.Mode.ToString(); LastReplicationTime = $_.LastReplicationTime.ToUniversalTime().ToString('o') } }
"""
"""Primary side: the relationship's state and health (`Final`: after the VM was shut down,
`Start-VMFailover -Prepare` ships what is left first)."""

REPLICA_POINTS = r"""
$vm = Get-VM -Id $p.VMId
$r = Get-VMReplication -VM $vm
[pscustomobject]@{
  Name = $vm.Name; LastReplicationTime = $r.LastReplicationTime.ToUniversalTime().ToString('o')
  Snapshots = @(Get-VMSnapshot -VM $vm -SnapshotType Replica | ForEach-Object {
    [pscustomobject]@{ Id = $_.Id.Guid; CreationTime = $_.CreationTime.ToUniversalTime().ToString('o') } })
}
"""
"""Replica side: its recovery points (the recovery history) and the latest replication."""

REPLICA_FAILOVER = r"""
$vm = Get-VM -Id $p.VMId
$snap = $null
if ($p.Snapshot) { $snap = Get-VMSnapshot -VM $vm | Where-Object { $_.Id.Guid -eq $p.Snapshot } }
if ($p.Test) {
  $name = "$($vm.Name) - Test"
  $t = Get-VM | Where-Object { $_.Name -eq $name } | Select-Object -First 1
  if (-not $t) {
    if ($snap) { Start-VMFailover -AsTest -VMRecoverySnapshot $snap -Confirm:$false }
    else { Start-VMFailover -AsTest -VM $vm -Confirm:$false }
    $t = Get-VM | Where-Object { $_.Name -eq $name } | Select-Object -First 1
  }
  if (-not (Get-VMSwitch | Where-Object { $_.Name -eq $p.TestSwitch })) {
    New-VMSwitch -Name $p.TestSwitch -SwitchType Private | Out-Null
  }
  Get-VMNetworkAdapter -VM $t | Connect-VMNetworkAdapter -SwitchName $p.TestSwitch
  if ($t.State -ne 'Running') { Start-VM -VM $t }
  $vm = $t
} elseif ($vm.State -ne 'Running') {
  if ($snap) { Start-VMFailover -VMRecoverySnapshot $snap -Confirm:$false }
  else { Start-VMFailover -VM $vm -Confirm:$false }
  foreach ($n in $p.Nics) {
    Get-VMNetworkAdapter -VM $vm | Where-Object { $_.MacAddress -eq $n.Mac } |
      Connect-VMNetworkAdapter -SwitchName $n.Switch
  }
  Start-VM -VM $vm
}
[pscustomobject]@{ Id = $vm.VMId.Guid; Name = $vm.Name }
"""
"""Replica side: a drill (`Start-VMFailover -AsTest`: Hyper-V's `<vm> - Test` VM, on the
private switch) or a failover (`Start-VMFailover` on the chosen recovery point, NICs on the
mapped switches, `Start-VM`)."""

REPLICA_STOP_TEST = r"""
Stop-VMFailover -VM (Get-VM -Id $p.VMId)
"""
"""Replica side: end a drill (Hyper-V removes the test VM)."""

REPLICA_COMPLETE = r"""
Complete-VMFailover -VM (Get-VM -Id $p.VMId) -Confirm:$false
"""
"""Replica side: commit a failover (the other recovery points go)."""

REPLICA_REVERSE = r"""
$a = @{ VM = (Get-VM -Id $p.VMId); Reverse = $true; ReplicaServerName = $p.Server
  ReplicaServerPort = $p.Port; AuthenticationType = $p.Auth }
if ($p.Thumbprint) { $a.CertificateThumbprint = $p.Thumbprint }
Set-VMReplication @a
"""
"""The new primary (the failed-over VM's host): replicate back to the old primary."""

REPLICA_DISABLE = r"""
Get-VM -Id $p.VMId | Remove-VMReplication
"""
"""Either side: end the replication relationship (the VMs stay)."""
