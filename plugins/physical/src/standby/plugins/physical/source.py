"""libvirt as a source: checkpoints + pull-mode backup over NBD, read with libnbd."""

from __future__ import annotations

import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from standby.core.errors import NotFound, PluginError, StandbyError, TransientError
from standby.core.imagefiles.nbd import DIRTY, STATE_ZERO, NbdPool, extents, nbd_module
from standby.core.interfaces import Buffer, Snapshot, Source, SourceCapabilities
from standby.core.model import Consistency, Extent, VMSpec
from standby.plugins.physical import conn as lv
from standby.plugins.physical.domxml import parse_domain

CHECKPOINT_PREFIX = "standby-"
APPLIANCE = "standby-replica-"
"""Replica appliances of a site that is also a DR target are not VMs to protect."""
STATES = {
    0: "unknown",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "crashed",
    7: "suspended",
}


@dataclass
class _Backup:
    """What an open snapshot holds: the domain, the NBD server and the export names."""

    dom: Any
    pool: NbdPool
    exports: dict[str, str]
    bitmaps: dict[str, str]
    scratch: list[Path] = field(default_factory=list)
    started_paused: bool = False


class PhysicalSource(lv.LibvirtPlugin, Source):
    """Domains of a libvirt host (a physical server stand-in, or a KVM host)."""

    plugin_name = "physical"
    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities(
        change_tracking=True, app_consistent=True, power_ops=True, max_parallel_reads=4
    )

    def check(self) -> list[str]:
        self.connect()
        with lv.libvirt_errors(f"site '{self.site.name}'"):
            return [
                f"libvirt {self.conn.getLibVersion()} at {self.conn.getURI()}",
                f"{len(self.conn.listAllDomains())} domain(s)",
            ]

    # ------------------------------------------------------------ inventory

    def _domain(self, key: str) -> Any:
        libvirt = lv.libvirt_module()
        for lookup in (self.conn.lookupByUUIDString, self.conn.lookupByName):
            try:
                return lookup(key)
            except libvirt.libvirtError:
                continue
        raise NotFound(f"VM '{key}' not found at site '{self.site.name}'")

    def _spec(self, dom: Any) -> VMSpec:
        with lv.libvirt_errors(f"site '{self.site.name}': inventory of {dom.name()}"):
            xml = dom.XMLDesc(0)
            sizes: dict[str, int] = {}
            for disk in ET.fromstring(xml).iter("disk"):
                target = disk.find("target")
                if disk.get("device", "disk") == "disk" and target is not None:
                    dev = str(target.get("dev"))
                    sizes[dev] = int(dom.blockInfo(dev)[0])
            state = STATES.get(dom.state()[0], "unknown")
        return parse_domain(xml, sizes, state)

    def list_vms(self) -> list[VMSpec]:
        with lv.libvirt_errors(f"site '{self.site.name}'"):
            doms = [d for d in self.conn.listAllDomains() if not d.name().startswith(APPLIANCE)]
        return sorted((self._spec(d) for d in doms), key=lambda v: v.name)

    def get_vm(self, key: str) -> VMSpec:
        return self._spec(self._domain(key))

    # ------------------------------------------------------------ snapshots

    def token_valid(self, vm: VMSpec, token: str) -> bool:
        libvirt = lv.libvirt_module()
        try:
            self._domain(vm.id).checkpointLookupByName(token)
            return True
        except (libvirt.libvirtError, NotFound):
            return False

    def release_tokens(self, vm: VMSpec, keep: Mapping[str, str | None]) -> None:
        keep_names = {t for t in keep.values() if t}
        dom = self._domain(vm.id)
        with lv.libvirt_errors(f"VM '{vm.name}': dropping old checkpoints"):
            for cp in dom.listAllCheckpoints():
                name = cp.getName()
                if name.startswith(CHECKPOINT_PREFIX) and name not in keep_names:
                    cp.delete(0)

    def _abort_stale_backup(self, dom: Any) -> None:
        """End a backup job left by a killed run (its export and scratch files go with it)."""
        self._end_backup(dom, stale=True)

    @staticmethod
    def _end_backup(dom: Any, *, stale: bool = False) -> None:
        """Abort the domain's backup job and wait until libvirt has processed its end.

        Returning before libvirt has seen the end leaves QEMU's NBD server up if this process
        exits at once (the end is handled on an event), and the next backup cannot start."""
        libvirt = lv.libvirt_module()
        deadline = time.monotonic() + 30
        aborted = False
        while True:
            try:
                dom.backupGetXMLDesc(0)
            except libvirt.libvirtError:
                return
            if not aborted:
                with suppress(libvirt.libvirtError):
                    dom.abortJob()
                aborted = True
            if time.monotonic() > deadline:
                what = "a stale backup job" if stale else "the backup job"
                raise TransientError(f"{what} on {dom.name()} does not end")
            time.sleep(0.005)

    @staticmethod
    def _stop_leftover_nbd_server(dom: Any) -> bool:
        """Stop an NBD server QEMU still runs for a backup libvirt no longer knows of.

        That happens when a process ended a backup and exited before libvirt processed the
        job's end. Only used after backupBegin failed for exactly that reason."""

        def qmp(command: str, **arguments: Any) -> dict[str, Any]:
            try:
                return lv.qmp(dom, command, **arguments)
            except Exception as exc:  # any failure means "not stopped"
                return {"error": {"desc": str(exc)}}

        for export in qmp("query-block-exports").get("return") or []:
            qmp("block-export-del", id=export["id"], mode="hard")
        stopped = "error" not in qmp("nbd-server-stop")
        return stopped

    @contextmanager
    def open_snapshot(
        self, vm: VMSpec, consistency: Consistency, since: Mapping[str, str | None]
    ) -> Iterator[Snapshot]:
        libvirt = lv.libvirt_module()
        dom = self._domain(vm.id)
        what = f"VM '{vm.name}': backup"
        work = self.opts.work_path()
        work.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        sock = work / f"src-{vm.id[:8]}.sock"
        started_paused = False
        notes: list[str] = []
        with lv.libvirt_errors(what):
            if not dom.isActive():
                # A stopped VM is started paused so QEMU can serve a point-in-time export.
                dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
                started_paused = True
            self._abort_stale_backup(dom)
        if sock.exists():
            sock.unlink()
        checkpoint = f"{CHECKPOINT_PREFIX}{datetime.now(UTC):%Y%m%dT%H%M%S}-{tag}"
        used_since: dict[str, str | None] = {}
        tokens: dict[str, str | None] = {}
        disks_xml: list[str] = []
        cp_disks: list[str] = []
        scratch: list[Path] = []
        for disk in vm.disks:
            base = since.get(disk.name)
            if base and not self.token_valid(vm, base):
                notes.append(f"disk {disk.name}: checkpoint {base} is gone; full read")
                base = None
            if not disk.change_tracking:
                base = None
            used_since[disk.name] = base
            tokens[disk.name] = checkpoint if disk.change_tracking else None
            path = work / f"scratch-{vm.id[:8]}-{disk.name}.qcow2"
            path.unlink(missing_ok=True)
            scratch.append(path)
            mode = f"backupmode='incremental' incremental='{base}'" if base else "backupmode='full'"
            disks_xml.append(
                f"<disk name='{disk.name}' backup='yes' type='file' {mode}>"
                f"<scratch file='{path}'/></disk>"
            )
            kind = "bitmap" if disk.change_tracking else "no"
            cp_disks.append(f"<disk name='{disk.name}' checkpoint='{kind}'/>")
            if not disk.change_tracking:
                notes.append(f"disk {disk.name} is {disk.format}: no change tracking, hash-compare")
        backup_xml = (
            f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/>"
            f"<disks>{''.join(disks_xml)}</disks></domainbackup>"
        )
        cp_xml = (
            f"<domaincheckpoint><name>{checkpoint}</name>"
            f"<disks>{''.join(cp_disks)}</disks></domaincheckpoint>"
        )
        if not any(d.change_tracking for d in vm.disks):
            cp_xml = None  # type: ignore[assignment]
            tokens = {d.name: None for d in vm.disks}
        frozen = False
        if consistency is Consistency.APP:
            try:
                dom.fsFreeze(None, 0)
                frozen = True
            except libvirt.libvirtError as exc:
                notes.append(f"guest agent did not freeze filesystems ({exc.get_error_message()})")
        try:
            try:
                dom.backupBegin(backup_xml, cp_xml, 0)
            except libvirt.libvirtError as exc:
                leftover = "NBD server already running" in str(exc.get_error_message())
                if not (leftover and self._stop_leftover_nbd_server(dom)):
                    raise lv.translate(exc, what) from exc
                notes.append("stopped an NBD server a previous run left behind")
                for path in scratch:
                    path.unlink(missing_ok=True)
                with lv.libvirt_errors(what):
                    dom.backupBegin(backup_xml, cp_xml, 0)
            taken_at = datetime.now(UTC)
        finally:
            if frozen:
                try:
                    dom.fsThaw(None, 0)
                except libvirt.libvirtError:
                    notes.append("guest agent did not thaw filesystems")
        backup = _Backup(
            dom=dom,
            pool=NbdPool(sock),
            exports={},
            bitmaps={},
            scratch=scratch,
            started_paused=started_paused,
        )
        try:
            with lv.libvirt_errors(what):
                desc = ET.fromstring(dom.backupGetXMLDesc(0))
            for d in desc.iter("disk"):
                name = str(d.get("name"))
                backup.exports[name] = d.get("exportname") or name
                if d.get("exportbitmap"):
                    backup.bitmaps[name] = str(d.get("exportbitmap"))
            snap = Snapshot(
                vm=vm,
                consistency=Consistency.APP if frozen else Consistency.CRASH,
                taken_at=taken_at,
                since=used_since,
                tokens=tokens,
                handle=backup,
                notes=notes,
            )
            yield snap
        finally:
            backup.pool.close()
            with suppress(StandbyError):
                self._end_backup(dom)
            if started_paused:
                with suppress(libvirt.libvirtError):
                    dom.destroy()
            for path in scratch:
                path.unlink(missing_ok=True)

    def changed_extents(self, snapshot: Snapshot, disk: str) -> Iterator[Extent]:
        backup: _Backup = snapshot.handle
        export = backup.exports[disk]
        if snapshot.since.get(disk):
            bitmap = backup.bitmaps.get(disk)
            if not bitmap:
                raise PluginError(f"disk '{disk}': incremental export has no dirty bitmap")
            ctx = f"qemu:dirty-bitmap:{bitmap}"
            want, match = DIRTY, DIRTY
        else:
            ctx = "base:allocation"
            want, match = STATE_ZERO, 0
        h = backup.pool.handle(export, (ctx,))
        for start, end in extents(h, ctx, want, match):
            yield Extent(start, end - start)

    def read(self, snapshot: Snapshot, disk: str, extent: Extent) -> Buffer:
        backup: _Backup = snapshot.handle
        h = backup.pool.handle(backup.exports[disk])
        nbd = nbd_module()
        try:
            return h.pread(extent.length, extent.offset)  # type: ignore[no-any-return]
        except nbd.Error as exc:
            raise StandbyError(f"disk '{disk}': NBD read at {extent.offset} failed: {exc}") from exc

    # ------------------------------------------------------------ power

    def power_off(self, vm: VMSpec, force: bool = False) -> None:
        with lv.libvirt_errors(f"VM '{vm.name}': shutdown"):
            dom = self._domain(vm.id)
            if dom.isActive():
                if force:
                    dom.destroy()
                else:
                    dom.shutdown()

    def power_on(self, vm: VMSpec) -> None:
        with lv.libvirt_errors(f"VM '{vm.name}': start"):
            dom = self._domain(vm.id)
            if not dom.isActive():
                dom.create()
