"""Hyper-V as a source: a checkpoint per cycle, Resilient Change Tracking, VHDX over SMB.

A cycle is two WinRM round trips. The first removes checkpoints a killed run left
(`standby-cycle-*`), takes one (production = VSS in the guest when the policy asks for an
app-consistent point, else standard = crash-consistent; a production checkpoint that fails
falls back with a note), and for each of the checkpoint's disks returns its frozen file, its
RCT id (the token of the next cycle) and the ranges changed since the last point's id
(`Msvm_ImageManagementService.GetVirtualDiskChanges`). The engine then reads those ranges of
the frozen VHDX over SMB (`smb.py` + `vhdx.py`) while the VM writes to its new AVHDX; the
second round trip removes the checkpoint (Hyper-V merges it). An RCT id the host refuses
(VM migrated, disk merged or replaced) makes that disk a full read the engine hash-compares,
with a note saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from standby.core.config import Site
from standby.core.errors import PluginError, StandbyError
from standby.core.interfaces import Buffer, Snapshot, Source, SourceCapabilities
from standby.core.model import Consistency, Extent, VMSpec

from . import files, inventory, scripts, smb
from .conn import HyperVOptions, PowerShell, as_list
from .vhdx import VhdxReader

log = logging.getLogger(__name__)

PREFIX = "standby-cycle-"
READS_PER_DISK = files.CONNECTIONS


@dataclass
class _Disk:
    path: str
    size: int
    rct: str | None
    changes: list[tuple[int, int]] | None = None
    reader: VhdxReader | None = None


@dataclass
class _Handle:
    name: str
    disks: dict[str, _Disk] = field(default_factory=dict)
    stack: ExitStack = field(default_factory=ExitStack)


class HyperVSource(Source):
    """The VMs of one Hyper-V host (standby's own replica and test VMs are not listed)."""

    plugin_name = "hyperv"
    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities(
        change_tracking=True,
        app_consistent=True,
        power_ops=True,
        max_parallel_reads=READS_PER_DISK,
        tokens_released=False,
    )

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self.opts = site.options(HyperVOptions)
        self.ps = PowerShell(self.opts)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        for module in ("winrm", "smbprotocol"):
            try:
                __import__(module)
            except ImportError:
                return f"{module} is not installed"
        return None

    def connect(self) -> None:
        self.ps.connect()

    def close(self) -> None:
        self.ps.close()
        smb.TREES.drain(self.opts.smb_host or self.opts.host)

    def check(self) -> list[str]:
        vms = self.list_vms()
        return [f"connected to {self.ps.what}", f"{len(vms)} VMs to protect"]

    def list_vms(self) -> list[VMSpec]:
        return inventory.list_vms(self.ps)

    # ------------------------------------------------------------ checkpoints

    @contextmanager
    def open_snapshot(
        self, vm: VMSpec, consistency: Consistency, since: Mapping[str, str | None]
    ) -> Iterator[Snapshot]:
        taken_at = datetime.now(UTC)
        app = consistency is Consistency.APP
        params = {
            "VMId": vm.id,
            "Prefix": PREFIX,
            "Name": f"{PREFIX}{taken_at:%Y%m%dT%H%M%S.%fZ}",
            "App": app,
            "Since": {k: v for k, v in since.items() if v},
        }
        answer = self.ps.run(scripts.script("checkpoint", params, scripts.CHECKPOINT))
        handle = _Handle(name=str(params["Name"]))
        try:
            notes = [str(n) for n in as_list(answer.get("Notes"))]
            kind = str(answer.get("Kind", "Standard"))
            if app and kind != "Production" and not notes:
                notes.append("Hyper-V took a standard checkpoint: crash-consistent point")
            snapshot = Snapshot(
                vm=vm,
                consistency=Consistency.APP if kind == "Production" else Consistency.CRASH,
                taken_at=taken_at,
                since={},
                tokens={},
                handle=handle,
                notes=notes,
            )
            for raw in as_list(answer.get("Disks")):
                self._add_disk(vm, snapshot, raw, since)
            missing = {d.name for d in vm.disks} - set(handle.disks)
            if missing:
                raise PluginError(
                    f"VM '{vm.name}': the checkpoint has no disk {', '.join(sorted(missing))} "
                    "(disks changed since the inventory)"
                )
            yield snapshot
        finally:
            try:
                handle.stack.close()
            finally:
                self._remove_checkpoint(vm)

    def _remove_checkpoint(self, vm: VMSpec) -> None:
        """Drop the cycle's checkpoint. If the host is unreachable now, the point (already
        whole) stands: the next cycle's first script removes what is left."""
        try:
            self.ps.run(
                scripts.script(
                    "remove-checkpoint",
                    {"VMId": vm.id, "Prefix": PREFIX},
                    scripts.REMOVE_CHECKPOINT,
                )
            )
        except StandbyError as exc:
            log.warning("VM %s: checkpoint left for the next cycle to remove: %s", vm.name, exc)

    def _add_disk(
        self, vm: VMSpec, snap: Snapshot, raw: dict[str, Any], since: Mapping[str, str | None]
    ) -> None:
        name = str(raw["Name"])
        rct = str(raw.get("Rct") or "") or None
        disk = _Disk(path=str(raw["Path"]), size=int(raw["Size"]), rct=rct)
        handle: _Handle = snap.handle
        handle.disks[name] = disk
        snap.tokens[name] = rct
        token = since.get(name)
        if token and raw.get("ChangeError"):
            snap.notes.append(
                f"disk {name}: change tracking cannot answer for the last point "
                f"({raw['ChangeError']}); full read compared"
            )
            token = None
        elif token:
            changes = raw.get("Changes") or {}
            pairs = zip(
                as_list(changes.get("Offsets")), as_list(changes.get("Lengths")), strict=True
            )
            disk.changes = [(int(o), int(n)) for o, n in pairs]
        if rct is None:
            snap.notes.append(f"disk {name}: Resilient Change Tracking is off; read in full")
        snap.since[name] = token

    def _reader(self, handle: _Handle, name: str) -> VhdxReader:
        disk = handle.disks[name]
        if disk.reader is None:
            what = f"site '{self.site.name}': disk {name}"
            disk.reader = files.open_chain(self.opts, disk.path, what, handle.stack)
        return disk.reader

    def changed_extents(self, snapshot: Snapshot, disk: str) -> Iterator[Extent]:
        handle: _Handle = snapshot.handle
        d = handle.disks[disk]
        if snapshot.since.get(disk) and d.changes is not None:
            for offset, length in sorted(d.changes):
                end = min(offset + length, d.size)
                if end > offset:
                    yield Extent(offset, end - offset)
            return
        for start, end in self._reader(handle, disk).allocated():
            yield Extent(start, end - start)

    def read(self, snapshot: Snapshot, disk: str, extent: Extent) -> Buffer:
        return self._reader(snapshot.handle, disk).read(extent.offset, extent.length)

    def read_many(self, snapshot: Snapshot, disk: str, extents: list[Extent]) -> list[Buffer]:
        """The engine's batch of scattered blocks with their SMB reads in flight together on
        one connection, instead of a round trip each."""
        reader = self._reader(snapshot.handle, disk)
        return list(reader.read_many([(e.offset, e.length) for e in extents]))

    # ------------------------------------------------------------ tokens

    def token_valid(self, vm: VMSpec, token: str) -> bool:
        """An RCT id stays usable while the disk's tracking identity (all but its sequence
        number) is the one the disk has now; the host answers the rest at the checkpoint."""
        try:
            state = self.ps.run(scripts.script("rct-state", {"VMId": vm.id}, scripts.RCT_STATE))
        except StandbyError:
            return False
        ident = token.rsplit(":", 1)[0]
        return any(str(d.get("Rct") or "").rsplit(":", 1)[0] == ident for d in as_list(state))

    def release_tokens(self, vm: VMSpec, keep: Mapping[str, str | None]) -> None:
        """RCT ids are the host's and stay valid; on unprotect (`keep` empty) any cycle
        checkpoint a killed run left is removed."""
        if not any(keep.values()):
            self.ps.run(
                scripts.script(
                    "remove-checkpoint",
                    {"VMId": vm.id, "Prefix": PREFIX},
                    scripts.REMOVE_CHECKPOINT,
                )
            )

    # ------------------------------------------------------------ power

    def _power(self, vm: VMSpec, action: str) -> None:
        self.ps.run(scripts.script("power", {"VMId": vm.id, "Action": action}, scripts.POWER))

    def power_off(self, vm: VMSpec, force: bool = False) -> None:
        self._power(vm, "off" if force else "shutdown")

    def power_on(self, vm: VMSpec) -> None:
        self._power(vm, "start")
