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

from standby.plugins.hyperv import vhdx  # the format only: this double's New-VHD writes it


@dataclass
class Disk:
    path: Path
    controller: str = "SCSI"
    number: int = 0
    location: int = 0
    rct: str = field(default_factory=lambda: str(uuid.uuid4()))
    """The identity of the disk's change tracking (a new one after a reset)."""
    seq: int = 1
    log: list[tuple[int, int, int]] = field(default_factory=list)
    """(sequence, offset, length) of every guest write since tracking began."""

    @property
    def name(self) -> str:
        return f"{self.controller.lower()}{self.number}-{self.location}"

    def rct_id(self, seq: int | None = None) -> str:
        return f"rct:{self.rct}:{self.seq if seq is None else seq}"


@dataclass
class Checkpoint:
    id: str
    name: str
    kind: str
    frozen: list[tuple[Disk, Path, int]]
    """Each disk with its frozen file and the RCT sequence it was frozen at."""


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
    vss: bool = True
    """Whether the guest's backup integration service (VSS) answers: production checkpoints."""
    checkpoint_type: str = "Production"
    checkpoints: list[Checkpoint] = field(default_factory=list)
    avhdx: list[tuple[int, int, bytes]] = field(default_factory=list)
    """Guest writes made while a checkpoint exists, (disk index, offset, bytes): Hyper-V puts
    them in the AVHDX and merges them into the parent when the checkpoint goes."""
    repl: Replication | None = None
    """Hyper-V Replica: this VM's side of a relationship."""


@dataclass
class Replication:
    """One side of a Hyper-V Replica relationship (the replica VM has the primary's VMId)."""

    mode: str  # Primary | Replica | TestReplica
    partner: str  # the other host's name
    state: str = "Replicating"
    health: str = "Normal"
    last: str = ""
    history: int = 4
    snapshots: list[tuple[str, str, list[Path]]] = field(default_factory=list)
    """Replica side: recovery points, (id, time, a copy of each disk)."""


def _layout(path: Path) -> vhdx.Layout:
    f = vhdx.LocalFile(path)
    try:
        return vhdx.open_layout(f, str(path))
    finally:
        f.close()


def vhdx_size(path: Path) -> int:
    return _layout(path).size


def convert_to_json(items: list[Any]) -> str:
    """ConvertTo-Json of a pipeline: nothing, one object bare, or an array."""
    if not items:
        return ""
    return json.dumps(items[0] if len(items) == 1 else items)


MAX_CHECKPOINTS = 50  # Hyper-V's limit per VM


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


class HostError(Exception):
    """A cmdlet's error, as PowerShell prints it."""


@dataclass
class HyperVHost:
    """The model; `handle` is the WinRM double's handler. `root` is the host's `drive`
    directory (`C:\\Hyper-V`): paths the host names are Windows paths under it."""

    root: Path
    vms: dict[str, VM] = field(default_factory=dict)
    drive: str = "C:\\Hyper-V"
    fail_next: list[str] = field(default_factory=list)
    """Ops (`checkpoint`, ...) whose next call fails as if the host went away."""
    switches: dict[str, str] = field(default_factory=lambda: {"LAN": "External"})
    """Virtual switches: name -> SwitchType."""
    name: str = "hv"
    """This host's name as Hyper-V Replica partners reach it."""
    peers: dict[str, HyperVHost] = field(default_factory=dict)
    """Hosts reachable by name (Hyper-V Replica partners), this one included."""
    replica_server: bool = True
    """Whether Set-VMReplicationServer -ReplicationEnabled was run here."""

    def winpath(self, path: Path) -> str:
        return self.drive + "\\" + str(path.relative_to(self.root)).replace("/", "\\")

    def local(self, winpath: str) -> Path:
        rel = winpath[len(self.drive) :].lstrip("\\").replace("\\", "/")
        if not winpath.lower().startswith(self.drive.lower()) or ".." in rel.split("/"):
            raise HostError(f"Get-VHD : '{winpath}' is not an existing virtual hard disk file.")
        return self.root / rel

    def guest_write(self, vm: str, disk: int, offset: int, data: bytes) -> None:
        """Bytes the guest writes into its disk, fed to the RCT log: into the VHDX (with
        qemu-io), or, while a checkpoint freezes it, into the AVHDX until the merge."""
        target = self.vms[vm]
        d = target.disks[disk]
        d.seq += 1
        d.log.append((d.seq, offset, len(data)))
        if target.checkpoints:
            target.avhdx.append((disk, offset, data))
        else:
            self._write_vhdx(d.path, offset, data)

    @staticmethod
    def _write_vhdx(path: Path, offset: int, data: bytes) -> None:
        if _layout(path).has_parent:  # a differencing disk (qemu-io cannot write one)
            f = vhdx.LocalFile(path, write=True)
            try:
                w = vhdx.VhdxWriter.reopen(f, str(path), path.stat().st_size)
                w.write(offset, data)
                w.flush()
            finally:
                f.close()
            return
        src = path.with_suffix(".write")
        src.write_bytes(data)
        try:
            subprocess.run(
                ["qemu-io", "-f", "vhdx", "-c", f"write -s {src} {offset} {len(data)}",
                 str(path)], check=True, capture_output=True,
            )  # fmt: skip
        finally:
            src.unlink()

    def reset_rct(self, vm: str, disk: int = 0) -> None:
        """What a live migration to another host or a merge by hand does: every RCT id of the
        disk stops being valid."""
        d = self.vms[vm].disks[disk]
        d.rct, d.log = str(uuid.uuid4()), []

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
        m = re.search(r"^# standby:([\w-]+)\n\$p = ConvertFrom-Json '(.*)'$", script, re.M)
        if m:
            op, params = m.group(1), json.loads(m.group(2).replace("''", "'"))
            if op in self.fail_next:
                self.fail_next.remove(op)
                return "", "The WS-Management service cannot process the request.", 1
            try:
                out = getattr(self, "op_" + op.replace("-", "_"))(params)
            except HostError as exc:
                return "", str(exc), 1
            return convert_to_json(out if isinstance(out, list) else [out] if out else []), "", 0
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
        def hidden(vm: VM) -> bool:
            r = vm.repl
            return r is not None and (
                r.mode == "TestReplica" or (r.mode == "Replica" and vm.state == "Off")
            )

        return [v for v in self.vms.values() if "standby:replica" not in v.notes and not hidden(v)]

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
                    "Path": self.winpath(d.path),
                    "Size": vhdx_size(d.path),
                }
                for d in vm.disks
            ],
            "Nics": [
                {"Name": n.name, "MacAddress": n.mac, "SwitchName": n.switch} for n in vm.nics
            ],
        }

    # ------------------------------------------------------------ ops (source side)

    def vm_by_id(self, vm_id: str) -> VM:
        for vm in self.vms.values():
            if vm.id == vm_id:
                return vm
        raise HostError(f'Get-VM : Hyper-V was unable to find a virtual machine with ID "{vm_id}".')

    def _drop_checkpoints(self, vm: VM, prefix: str) -> None:
        vm.checkpoints = [c for c in vm.checkpoints if not c.name.startswith(prefix)]
        if not vm.checkpoints:  # the merge: what the guest wrote meanwhile reaches the VHDX
            pending, vm.avhdx = vm.avhdx, []
            for disk, offset, data in pending:
                self._write_vhdx(vm.disks[disk].path, offset, data)

    def op_checkpoint(self, p: dict[str, Any]) -> dict[str, Any]:
        vm = self.vm_by_id(p["VMId"])
        self._drop_checkpoints(vm, p["Prefix"])
        notes, kind = [], "Standard"
        if p["App"]:
            if vm.vss and vm.state == "Running":
                kind = "Production"
            else:
                notes.append(
                    f"production checkpoint failed (Checkpoint-VM : Production checkpoints "
                    f"cannot be created for '{vm.name}'.): crash-consistent point"
                )
        if len(vm.checkpoints) >= MAX_CHECKPOINTS:
            raise HostError(
                f"Checkpoint-VM : Cannot take checkpoint for '{vm.name}' because the maximum "
                f"number of checkpoints has been reached."
            )
        cp = Checkpoint(str(uuid.uuid4()), p["Name"], kind, [])
        for d in vm.disks:  # the VHDX itself is frozen: the guest writes to an AVHDX now
            cp.frozen.append((d, d.path, d.seq))
        vm.checkpoints.append(cp)
        disks = []
        for d, frozen, seq in cp.frozen:
            since = p["Since"].get(d.name)
            changes, err = None, None
            if since:
                try:
                    changes = self._changes(d, since, seq)
                except HostError as exc:
                    err = str(exc)
            disks.append({
                "Name": d.name, "Path": self.winpath(frozen), "Size": vhdx_size(frozen),
                "ParentPath": self._parent(frozen), "Rct": d.rct_id(seq), "Changes": changes,
                "ChangeError": err,
            })  # fmt: skip
        return {"Id": cp.id, "Name": cp.name, "Kind": kind, "Notes": notes, "Disks": disks}

    def _changes(self, d: Disk, since: str, upto: int) -> dict[str, list[int]]:
        """GetVirtualDiskChanges: what the guest wrote after `since`, up to the frozen file."""
        ident, _, seq = since.rpartition(":")
        if ident != f"rct:{d.rct}" or not seq.isdigit() or int(seq) > upto:
            raise HostError(
                f"GetVirtualDiskChanges : the change tracking id '{since}' is not valid for "
                f"{self.winpath(d.path)} (return value 32773)"
            )
        merged = _merge([(o, o + n) for s, o, n in d.log if int(seq) < s <= upto])
        return {"Offsets": [a for a, _ in merged], "Lengths": [b - a for a, b in merged]}

    def op_remove_checkpoint(self, p: dict[str, Any]) -> None:
        self._drop_checkpoints(self.vm_by_id(p["VMId"]), p["Prefix"])

    def op_rct_state(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"Name": d.name, "Rct": d.rct_id()} for d in self.vm_by_id(p["VMId"]).disks]

    def op_power(self, p: dict[str, Any]) -> None:
        vm = self.vm_by_id(p["VMId"])
        vm.state = "Running" if p["Action"] == "start" else "Off"

    # ------------------------------------------------------------ ops (DR side)

    def _parent(self, path: Path) -> str | None:
        lay = _layout(path)
        return vhdx.parent_path(lay.parent, self.winpath(path)) if lay.has_parent else None

    def new_vhd_differencing(self, child: Path, parent: Path) -> None:
        """New-VHD -Differencing: an empty child whose locator names the parent."""
        if not parent.exists():
            raise HostError(f"New-VHD : The system cannot find the file '{self.winpath(parent)}'.")
        lay = _layout(parent)
        child.parent.mkdir(parents=True, exist_ok=True)
        f = vhdx.LocalFile(child, write=True)
        try:
            vhdx.create(f, lay.size, block_size=2 << 20, parent=vhdx.locator_for(
                self.winpath(child), self.winpath(parent), lay.data_write_guid))  # fmt: skip
        finally:
            f.close()

    def op_switches(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"Name": n, "SwitchType": t} for n, t in self.switches.items()]

    def _marked(self, fid: int) -> VM | None:
        mark = f"standby:failover={fid};"
        return next((v for v in self.vms.values() if mark in v.notes), None)

    def op_failover(self, p: dict[str, Any]) -> dict[str, Any]:
        vm = self._marked(p["FailoverId"])
        made = False
        if vm is None and p["Original"]:
            vm = self.vm_by_id(p["Original"])
            if vm.state != "Off":
                raise HostError(
                    f"Start-VM : the original VM '{vm.name}' is {vm.state}; shut it down "
                    "before failing back"
                )
        if vm is None:
            if p["TestSwitch"] and p["TestSwitch"] not in self.switches:
                self.switches[p["TestSwitch"]] = "Private"
            for n in p["Nics"]:
                if n["Switch"] not in self.switches:
                    raise HostError(
                        f"Add-VMNetworkAdapter : Hyper-V was unable to find a virtual switch "
                        f'with name "{n["Switch"]}".'
                    )
            if p["Name"] in self.vms:
                raise HostError(f"New-VM : a virtual machine named '{p['Name']}' exists already.")
            vm = VM(name=p["Name"], generation=p["Generation"], cpus=p["Cpus"],
                    memory=p["Memory"], state="Off",
                    notes=f"{p['Notes']} standby:failover={p['FailoverId']};")  # fmt: skip
            vm.nics = [Nic(n["Name"], n["Mac"], n["Switch"]) for n in p["Nics"]]
            made = True
        for d in p["Disks"]:
            local = self.local(d["Path"])
            if not local.exists():
                self.new_vhd_differencing(local, self.local(d["Parent"]))
            slot = next(
                (x for x in vm.disks if (x.controller, x.number, x.location)
                 == (d["Type"], d["Number"], d["Location"])), None,
            )  # fmt: skip
            if slot is None:
                vm.disks.append(Disk(local, d["Type"], d["Number"], d["Location"]))
            else:
                slot.path, slot.rct, slot.log = local, str(uuid.uuid4()), []
        if made:
            self.vms[vm.name] = vm
        vm.state = "Running"
        return {"Id": vm.id, "Name": vm.name, "State": vm.state,
                "Disks": [self.winpath(d.path) for d in vm.disks]}  # fmt: skip

    def op_remove_vm(self, p: dict[str, Any]) -> None:
        mark = f"standby:failover={p['FailoverId']};"
        for name, vm in list(self.vms.items()):
            test = p.get("TestName") and name == p["TestName"] and "standby:replica" in vm.notes
            if mark in vm.notes or test:
                del self.vms[name]  # Remove-VM keeps the disk files, as Hyper-V does

    def op_vm_disks(self, p: dict[str, Any]) -> dict[str, Any] | None:
        vm = next((v for v in self.vms.values() if v.id == p["VMId"]), None) or next(
            (v for v in self.vms.values() if v.name == p["Name"] and "standby:" not in v.notes),
            None,
        )
        if vm is None:
            return None
        disks = [{"Name": d.name, "Path": self.winpath(d.path)} for d in vm.disks]
        return {"Id": vm.id, "Name": vm.name, "State": vm.state, "Disks": disks}

    # ------------------------------------------------------------ Hyper-V Replica

    def _peer(self, name: str, cmdlet: str) -> HyperVHost:
        peer = self.peers.get(name)
        if peer is None or not peer.replica_server:
            raise HostError(
                f"{cmdlet} : Hyper-V could not connect to the Replica server '{name}': the "
                "server is not reachable or not configured as a Replica server."
            )
        return peer

    @staticmethod
    def _now() -> str:
        from datetime import UTC, datetime

        return datetime.now(UTC).isoformat()

    def _ship(self, vm: VM) -> None:
        """One replication interval: the primary's disks reach the replica, as a new
        recovery point (the oldest beyond the history go)."""
        assert vm.repl is not None and vm.repl.mode == "Primary"
        peer = self.peers[vm.repl.partner]
        rvm = peer.vm_by_id(vm.id)
        assert rvm.repl is not None
        now = self._now()
        copies = []
        sid = str(uuid.uuid4())
        for d, rd in zip(vm.disks, rvm.disks, strict=True):
            rd.path.write_bytes(d.path.read_bytes())
            copy = rd.path.with_name(f"{rd.path.stem}.{sid[:8]}.vhdx")
            copy.write_bytes(d.path.read_bytes())
            copies.append(copy)
        rvm.repl.snapshots.append((sid, now, copies))
        while len(rvm.repl.snapshots) > max(1, rvm.repl.history):
            for f in rvm.repl.snapshots.pop(0)[2]:
                f.unlink(missing_ok=True)
        vm.repl.last = rvm.repl.last = now

    def op_replica_server(self, p: dict[str, Any]) -> dict[str, Any]:
        return {
            "ReplicationEnabled": self.replica_server,
            "AllowedAuthenticationType": "Certificate",
        }

    def op_replica_enable(self, p: dict[str, Any]) -> dict[str, Any]:
        vm = self.vm_by_id(p["VMId"])
        peer = self._peer(p["Server"], "Enable-VMReplication")
        if vm.repl is None:
            rvm = VM(name=vm.name, generation=vm.generation, cpus=vm.cpus, memory=vm.memory,
                     state="Off", id=vm.id)  # fmt: skip
            for i, d in enumerate(vm.disks):
                path = peer.root / "Replica" / vm.name / f"disk{i}.vhdx"
                path.parent.mkdir(parents=True, exist_ok=True)
                rvm.disks.append(Disk(path, d.controller, d.number, d.location))
            rvm.nics = [Nic(n.name, n.mac, "") for n in vm.nics]
            rvm.repl = Replication("Replica", self.name, history=p["History"])
            peer.vms[vm.name] = rvm
            vm.repl = Replication("Primary", p["Server"], history=p["History"])
        self._ship(vm)  # Start-VMInitialReplication: the initial copy
        return {"State": vm.repl.state, "Health": vm.repl.health}

    def op_replica_state(self, p: dict[str, Any]) -> dict[str, Any]:
        vm = self.vm_by_id(p["VMId"])
        if vm.repl is None or vm.repl.mode != "Primary":
            raise HostError(f"Get-VMReplication : '{vm.name}' is not a primary VM of replication.")
        if p["Final"]:
            if vm.state != "Off":
                raise HostError(
                    f"Start-VMFailover : the virtual machine '{vm.name}' must be turned off "
                    "to prepare a planned failover."
                )
            self._ship(vm)
            vm.repl.state = "PreparedForFailover"
        elif vm.state == "Running":
            self._ship(vm)  # the interval elapsed while the VM ran
        return {"State": vm.repl.state, "Health": vm.repl.health, "Mode": "Primary",
                "LastReplicationTime": vm.repl.last}  # fmt: skip

    def op_replica_points(self, p: dict[str, Any]) -> dict[str, Any]:
        vm = self.vm_by_id(p["VMId"])
        r = vm.repl
        if r is None:
            raise HostError(f"Get-VMReplication : '{vm.name}' has no replication.")
        snaps = [{"Id": i, "CreationTime": t} for i, t, _f in r.snapshots]
        return {"Name": vm.name, "LastReplicationTime": r.last, "Snapshots": snaps}

    def op_replica_failover(self, p: dict[str, Any]) -> dict[str, Any]:
        vm = self.vm_by_id(p["VMId"])
        if vm.repl is None or vm.repl.mode != "Replica":
            raise HostError(f"Start-VMFailover : '{vm.name}' is not a replica virtual machine.")
        chosen = next((f for i, _t, f in vm.repl.snapshots if i == p["Snapshot"]), None)
        if p["Snapshot"] and chosen is None:
            raise HostError(f"Start-VMFailover : no recovery point {p['Snapshot']} of '{vm.name}'.")
        if p["Test"]:
            name = f"{vm.name} - Test"
            if name not in self.vms:
                if p["TestSwitch"] not in self.switches:
                    self.switches[p["TestSwitch"]] = "Private"
                t = VM(name=name, generation=vm.generation, cpus=vm.cpus, memory=vm.memory)
                for i, d in enumerate(vm.disks):
                    copy = d.path.with_name(f"test-disk{i}.vhdx")
                    copy.write_bytes((chosen[i] if chosen else d.path).read_bytes())
                    t.disks.append(Disk(copy, d.controller, d.number, d.location))
                t.nics = [Nic(n.name, n.mac, p["TestSwitch"]) for n in vm.nics]
                t.repl = Replication("TestReplica", vm.repl.partner)
                self.vms[name] = t
            return {"Id": self.vms[name].id, "Name": name}
        if vm.state != "Running":
            if chosen:
                for d, f in zip(vm.disks, chosen, strict=True):
                    d.path.write_bytes(f.read_bytes())
            for n in vm.nics:
                n.switch = next((x["Switch"] for x in p["Nics"] if x["Mac"] == n.mac), n.switch)
            vm.repl.state = "FailedOver"
            vm.state = "Running"
        return {"Id": vm.id, "Name": vm.name}

    def op_replica_stop_test(self, p: dict[str, Any]) -> None:
        vm = self.vm_by_id(p["VMId"])
        test = self.vms.pop(f"{vm.name} - Test", None)
        for d in test.disks if test else []:
            d.path.unlink(missing_ok=True)

    def op_replica_complete(self, p: dict[str, Any]) -> None:
        vm = self.vm_by_id(p["VMId"])
        if vm.repl is None or vm.repl.state != "FailedOver":
            raise HostError(f"Complete-VMFailover : '{vm.name}' has not failed over.")
        for _i, _t, files in vm.repl.snapshots:
            for f in files:
                f.unlink(missing_ok=True)
        vm.repl.snapshots, vm.repl.state = [], "FailedOverComplete"

    def op_replica_reverse(self, p: dict[str, Any]) -> None:
        """Set-VMReplication -Reverse on the failed-over replica: it becomes the primary and
        the old primary (off) its replica; the first interval ships its disks back."""
        vm = self.vm_by_id(p["VMId"])
        if vm.repl is None or vm.repl.mode != "Replica" or vm.state != "Running":
            raise HostError(
                f"Set-VMReplication : '{vm.name}' must be a failed-over replica to reverse."
            )
        peer = self._peer(p["Server"], "Set-VMReplication")
        old = peer.vm_by_id(vm.id)
        history = vm.repl.history
        vm.repl = Replication("Primary", p["Server"], history=history)
        old.repl = Replication("Replica", self.name, history=history)
        self._ship(vm)

    def op_replica_disable(self, p: dict[str, Any]) -> None:
        self.vm_by_id(p["VMId"]).repl = None
