"""vSphere as a source: inventory, CBT, a snapshot per cycle, changed areas, disk bytes.

A cycle takes a snapshot named `standby-cycle-<time>` (quiesced when the policy asks for an
app-consistent point and VMware Tools run), asks `QueryChangedDiskAreas` what changed since
the last point's changeId (`"*"` on the first cycle: the allocated areas), reads those ranges
of the frozen base disk, and removes the snapshot. A killed run's snapshot is found by its
name and removed by the next one. A changeId vSphere no longer honours (CBT reset, disk
resized, snapshots consolidated by someone else) makes that disk a full read that the engine
hash-compares against the last point, with a note saying why.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from standby.core.config import Site
from standby.core.errors import (
    CapabilityNotSupported,
    NotFound,
    PluginError,
    StandbyError,
    TransientError,
)
from standby.core.interfaces import Buffer, Snapshot, Source, SourceCapabilities
from standby.core.model import Consistency, DiskSpec, Extent, Firmware, NicSpec, VMSpec

from . import conn
from .conn import REPLICA_KEY, SNAPSHOT_PREFIX, VMwareOptions, vim_errors, wait_task
from .reader import DatastorePath, HttpFlatReader, VddkReader, vddk_command

CBT_MIN_HW_VERSION = 7  # vSphere's rule: changed block tracking needs virtual hardware 7+


@dataclass
class _Disk:
    key: int
    size: int
    frozen: DatastorePath
    change_id: str | None


@dataclass
class _Handle:
    """What one open snapshot holds."""

    vm: Any
    name: str
    snap: Any
    disks: dict[str, _Disk]
    vddk: VddkReader | None = None
    first: dict[str, Any] = field(default_factory=dict)  # disk -> first DiskChangeInfo page


def disk_name(key: int) -> str:
    """A disk's stable name: its device key (controller and unit may be changed by hand)."""
    return f"disk{key}"


def hw_version(cfg: Any) -> int:
    """The virtual hardware version of a VM's config (`vmx-13` -> 13)."""
    text = str(getattr(cfg, "version", "") or "")
    return int(text[4:]) if text.startswith("vmx-") and text[4:].isdigit() else 0


def trackable(cfg: Any, device: Any) -> bool:
    """Whether CBT can track this disk (vSphere's rules, enforced even where a double is lax):
    hardware version 7 or later, and not a physical-mode raw device mapping."""
    from pyVmomi import vim

    if hw_version(cfg) < CBT_MIN_HW_VERSION:
        return False
    backing = device.backing
    rdm = vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo
    return not (isinstance(backing, rdm) and backing.compatibilityMode == "physicalMode")


def disk_size(device: Any) -> int:
    return int(getattr(device, "capacityInBytes", 0) or 0) or int(device.capacityInKB) * 1024


class VMwareSource(Source):
    """VMs of one vCenter datacenter (optionally one cluster or folder)."""

    plugin_name = "vmware"
    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities(
        change_tracking=True,
        app_consistent=True,
        power_ops=True,
        max_parallel_reads=8,
        tokens_released=False,
    )

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self.opts = site.options(VMwareOptions)
        self.si: Any = None
        self.vm_folder: Any = None
        self.reader: HttpFlatReader | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import pyVmomi  # noqa: F401
        except ImportError:
            return "pyvmomi is not installed"
        return None

    # ------------------------------------------------------------ connection

    def connect(self) -> None:
        if self.si is not None:
            return

        si, dc = conn.open_datacenter(self.opts, self.site.name)
        with vim_errors(f"vCenter {self.opts.host}"):
            self.si, self.vm_folder = si, dc.vmFolder
        self.reader = HttpFlatReader(self.opts, self.opts.datacenter, si._stub.cookie)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.si is not None:
            conn.disconnect(self.si)
            self.si = None

    def check(self) -> list[str]:
        self.connect()
        with vim_errors(f"vCenter {self.opts.host}"):
            product = self.si.content.about.fullName
        return [
            f"connected to {product} at {self.opts.host}",
            f"datacenter {self.opts.datacenter}: {len(self.list_vms())} VMs to protect",
        ]

    # ------------------------------------------------------------ inventory

    def _objects(self) -> list[tuple[Any, Any]]:
        """The protectable VMs, each with its config (fetched once: every property read of
        a managed object is a round trip to vCenter)."""
        from pyVmomi import vim

        self.connect()
        with vim_errors(f"site '{self.site.name}': inventory"):
            view = self.si.content.viewManager.CreateContainerView(
                self.vm_folder, [vim.VirtualMachine], True
            )
            try:
                vms = list(view.view)
            finally:
                view.Destroy()
            out = []
            for vm in vms:
                cfg = vm.config
                if cfg is None or cfg.template:
                    continue
                if any(o.key == REPLICA_KEY for o in cfg.extraConfig or ()):
                    continue
                if self.opts.cluster and _cluster(vm) != self.opts.cluster:
                    continue
                if self.opts.folder and not _in_folder(vm, self.opts.folder):
                    continue
                out.append((vm, cfg))
        return out

    def list_vms(self) -> list[VMSpec]:
        with vim_errors(f"site '{self.site.name}': inventory"):
            return [self._spec(vm, cfg) for vm, cfg in self._objects()]

    def _find(self, key: str) -> tuple[Any, Any]:
        """The VM and its config, by instance UUID, name or moref."""
        for vm, cfg in self._objects():
            if key in (cfg.instanceUuid, cfg.name, vm._moId):
                return vm, cfg
        raise NotFound(f"VM '{key}' not found at site '{self.site.name}'")

    def get_vm(self, key: str) -> VMSpec:
        vm, cfg = self._find(key)
        with vim_errors(f"VM '{key}'"):
            return self._spec(vm, cfg)

    def _spec(self, vm: Any, cfg: Any) -> VMSpec:
        from pyVmomi import vim

        disks: list[DiskSpec] = []
        nics: list[NicSpec] = []
        extra = {
            "moref": str(vm._moId),
            "hw_version": str(hw_version(cfg)),
            "guest_id": str(cfg.guestId or ""),
        }
        dv_names: dict[str, str] | None = None
        for dev in cfg.hardware.device:
            if isinstance(dev, vim.vm.device.VirtualEthernetCard) and dv_names is None:
                dv_names = _dv_names(vm)
            if isinstance(dev, vim.vm.device.VirtualDisk):
                name = disk_name(dev.key)
                disks.append(
                    DiskSpec(
                        name=name,
                        size=disk_size(dev),
                        format="vmdk",
                        change_tracking=trackable(cfg, dev),
                        boot=not disks,
                    )
                )
                extra[f"{name}.file"] = str(getattr(dev.backing, "fileName", ""))
            elif isinstance(dev, vim.vm.device.VirtualEthernetCard):
                nics.append(
                    NicSpec(
                        name=dev.deviceInfo.label if dev.deviceInfo else str(dev.key),
                        mac=dev.macAddress or "",
                        network=_port_group(dev, dv_names or {}),
                        model=type(dev).__name__.rsplit(".", 1)[-1].removeprefix("Virtual"),
                    )
                )
        power = str(vm.runtime.powerState)
        return VMSpec(
            id=cfg.instanceUuid or vm._moId,
            name=cfg.name,
            cpus=int(cfg.hardware.numCPU),
            memory_mib=int(cfg.hardware.memoryMB),
            firmware=Firmware.UEFI if cfg.firmware == "efi" else Firmware.BIOS,
            disks=tuple(disks),
            nics=tuple(nics),
            guest_os=cfg.guestFullName or cfg.guestId or "unknown",
            power_state={"poweredOn": "running", "poweredOff": "shutoff"}.get(power, power),
            extra=extra,
        )

    # ------------------------------------------------------------ snapshots

    def _our_snapshots(self, vm: Any) -> list[Any]:
        found: list[Any] = []

        def walk(nodes: Any) -> None:
            for node in nodes or ():
                if str(node.name).startswith(SNAPSHOT_PREFIX):
                    found.append(node.snapshot)
                walk(node.childSnapshotList)

        walk(vm.snapshot.rootSnapshotList if vm.snapshot else ())
        return found

    def _remove_snapshot(self, vm: Any, snap: Any, name: str) -> None:
        """Remove one snapshot; a dropped connection is tried once more (pyvmomi opens a new
        one on the same session): the clean-up of a cycle should not fail on a blip."""
        what = f"VM '{name}': remove snapshot"
        for attempt in (1, 2):
            try:
                with vim_errors(what):
                    task = snap.RemoveSnapshot_Task(removeChildren=False, consolidate=True)
                break
            except TransientError:
                if attempt == 2:
                    raise
        try:
            wait_task(task, what, self.opts.task_timeout)
        except StandbyError:
            # Some servers' RemoveSnapshot task info does not parse: the snapshot tree says.
            with vim_errors(what):
                if any(s._moId == snap._moId for s in self._our_snapshots(vm)):
                    raise

    def _enable_cbt(self, vm: Any, cfg: Any, name: str) -> None:
        from pyVmomi import vim

        if cfg.changeTrackingEnabled or hw_version(cfg) < CBT_MIN_HW_VERSION:
            return
        what = f"VM '{name}': enable change tracking"
        with vim_errors(what):
            task = vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True))
        wait_task(task, what, self.opts.task_timeout)

    def _take(self, vm: Any, vm_name: str, quiesce: bool) -> Any:
        name = f"{SNAPSHOT_PREFIX}-{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}"
        what = f"VM '{vm_name}': snapshot"
        with vim_errors(what):
            task = vm.CreateSnapshot_Task(
                name=name, description="standby replication cycle", memory=False, quiesce=quiesce
            )
        return wait_task(task, what, self.opts.task_timeout)

    @contextmanager
    def open_snapshot(
        self, vm: VMSpec, consistency: Consistency, since: Mapping[str, str | None]
    ) -> Iterator[Snapshot]:
        obj, cfg = self._find(vm.id)
        with vim_errors(f"VM '{vm.name}': snapshots"):
            stale = self._our_snapshots(obj)
            tools = str(obj.guest.toolsRunningStatus)
        for old in stale:
            self._remove_snapshot(obj, old, vm.name)  # left by a killed run
        self._enable_cbt(obj, cfg, vm.name)
        notes: list[str] = []
        quiesce = consistency is Consistency.APP
        if quiesce and tools != "guestToolsRunning":
            quiesce = False
            notes.append("VMware Tools are not running: crash-consistent point")
        taken_at = datetime.now(UTC)
        try:
            snap = self._take(obj, vm.name, quiesce)
        except StandbyError as exc:
            if not quiesce:
                raise
            quiesce = False
            notes.append(f"quiesced snapshot failed ({exc}): crash-consistent point")
            snap = self._take(obj, vm.name, False)
        stack = ExitStack()
        try:
            handle = self._handle(obj, cfg, vm.name, snap)
            if self.opts.vddk_libdir:
                handle.vddk = self._start_vddk(handle, stack)
            snapshot = Snapshot(
                vm=vm,
                consistency=Consistency.APP if quiesce else Consistency.CRASH,
                taken_at=taken_at,
                since={},
                tokens={n: d.change_id for n, d in handle.disks.items()},
                handle=handle,
                notes=notes,
            )
            for name, d in handle.disks.items():
                snapshot.since[name] = self._usable_since(handle, name, since.get(name), notes)
                if d.change_id is None and vm.disk(name).change_tracking:
                    notes.append(f"disk {name}: vSphere gave no changeId; next cycle reads it all")
            yield snapshot
        finally:
            try:
                stack.close()  # the VDDK readers go before their snapshot
            finally:
                self._remove_snapshot(obj, snap, vm.name)

    def _start_vddk(self, handle: _Handle, stack: ExitStack) -> VddkReader:
        """One nbdkit + VDDK per frozen disk, in a private directory with the password file
        (mode 0600); all of it goes when the snapshot is left."""
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="standby-vddk-")))
        secret = work / "password"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.opts.secret("password"))
        sha1 = conn.peer_sha1(self.opts)
        vddk = VddkReader()
        stack.callback(vddk.close)
        for name, d in handle.disks.items():
            sock = work / f"{name}.sock"
            cmd = vddk_command(
                self.opts,
                socket_path=str(sock),
                vm_moref=str(handle.vm._moId),
                snapshot_moref=str(handle.snap._moId),
                disk=d.frozen,
                password_file=str(secret),
                sha1_thumbprint=sha1,
            )
            vddk.start(name, cmd, sock)
        return vddk

    def _handle(self, obj: Any, cfg: Any, vm_name: str, snap: Any) -> _Handle:
        from pyVmomi import vim

        with vim_errors(f"VM '{vm_name}': snapshot disks"):
            disks = {}
            for dev in snap.config.hardware.device:
                if not isinstance(dev, vim.vm.device.VirtualDisk):
                    continue
                backing = dev.backing
                if getattr(backing, "parent", None) is not None and not self.opts.vddk_libdir:
                    raise CapabilityNotSupported(
                        f"VM '{vm_name}' has snapshots of its own: the HTTP disk reader reads "
                        "only a base disk; delete them, or set vddk_libdir"
                    )
                disks[disk_name(dev.key)] = _Disk(
                    key=dev.key,
                    size=disk_size(dev),
                    frozen=DatastorePath.parse(str(getattr(backing, "fileName", ""))),
                    change_id=(getattr(backing, "changeId", None) or None)
                    if trackable(cfg, dev)
                    else None,
                )
        return _Handle(vm=obj, name=vm_name, snap=snap, disks=disks)

    def _query(self, handle: _Handle, disk: _Disk, start: int, change_id: str) -> Any:
        with vim_errors(f"VM '{handle.name}': changed areas of {disk_name(disk.key)}"):
            return handle.vm.QueryChangedDiskAreas(
                snapshot=handle.snap, deviceKey=disk.key, startOffset=start, changeId=change_id
            )

    def _usable_since(
        self, handle: _Handle, name: str, token: str | None, notes: list[str]
    ) -> str | None:
        """The token if vSphere still answers for it (its first page is kept), else None."""
        disk = handle.disks[name]
        if token is None or disk.change_id is None:
            return None
        try:
            handle.first[name] = self._query(handle, disk, 0, token)
        except PluginError as exc:
            notes.append(f"disk {name}: change tracking was reset ({exc}); full read compared")
            return None
        return token

    def changed_extents(self, snapshot: Snapshot, disk: str) -> Iterator[Extent]:
        handle: _Handle = snapshot.handle
        d = handle.disks[disk]
        since = snapshot.since.get(disk)
        if d.change_id is None and since is None and not snapshot.vm.disk(disk).change_tracking:
            yield Extent(0, d.size)  # CBT cannot track it: the engine hash-compares
            return
        change_id = since or "*"
        start = 0
        info = handle.first.pop(disk, None)
        while start < d.size:
            if info is None:
                info = self._query(handle, d, start, change_id)
            for area in info.changedArea or ():
                begin, end = int(area.start), min(int(area.start) + int(area.length), d.size)
                if end > begin:
                    yield Extent(begin, end - begin)
            covered = int(info.startOffset) + int(info.length)
            if covered <= start:
                raise PluginError(f"VM '{handle.name}': changed areas of {disk} do not advance")
            start, info = covered, None

    def read(self, snapshot: Snapshot, disk: str, extent: Extent) -> Buffer:
        handle: _Handle = snapshot.handle
        if handle.vddk is not None:
            return handle.vddk.read(disk, extent.offset, extent.length)
        assert self.reader is not None
        return self.reader.read(handle.disks[disk].frozen.flat(), extent.offset, extent.length)

    def read_many(self, snapshot: Snapshot, disk: str, extents: list[Extent]) -> list[Buffer]:
        """The engine's batch of scattered blocks in one multi-range GET (when the datastore
        file service answers those), instead of a round trip each."""
        handle: _Handle = snapshot.handle
        if handle.vddk is not None or self.reader is None:
            return super().read_many(snapshot, disk, extents)
        where = handle.disks[disk].frozen.flat()
        return list(self.reader.read_ranges(where, [(e.offset, e.length) for e in extents]))

    def token_valid(self, vm: VMSpec, token: str) -> bool:
        """A changeId stays valid while the disk's change tracking keeps its identity (the part
        before '/'); vSphere itself answers the rest at the next snapshot."""
        from pyVmomi import vim

        ident = token.rsplit("/", 1)[0]
        _obj, cfg = self._find(vm.id)
        with vim_errors(f"VM '{vm.name}': change tracking"):
            if not cfg.changeTrackingEnabled:
                return False
            for dev in cfg.hardware.device:
                if isinstance(dev, vim.vm.device.VirtualDisk):
                    current = getattr(dev.backing, "changeId", None) or ""
                    if current.rsplit("/", 1)[0] == ident:
                        return True
        return False

    # ------------------------------------------------------------ power

    def power_off(self, vm: VMSpec, force: bool = False) -> None:
        from pyVmomi import vim

        obj, _cfg = self._find(vm.id)
        with vim_errors(f"VM '{vm.name}': shutdown"):
            if str(obj.runtime.powerState) != "poweredOn":
                return
            if not force:
                with suppress(vim.fault.ToolsUnavailable):  # no tools: the caller's timeout
                    obj.ShutdownGuest()  # then forces it
                return
            task = obj.PowerOffVM_Task()
        wait_task(task, f"VM '{vm.name}': power off", self.opts.task_timeout)

    def power_on(self, vm: VMSpec) -> None:
        obj, _cfg = self._find(vm.id)
        with vim_errors(f"VM '{vm.name}': start"):
            if str(obj.runtime.powerState) == "poweredOn":
                return
            task = obj.PowerOnVM_Task()
        wait_task(task, f"VM '{vm.name}': start", self.opts.task_timeout)


def _cluster(vm: Any) -> str | None:
    host = vm.runtime.host
    parent = getattr(host, "parent", None) if host is not None else None
    return getattr(parent, "name", None)


def _in_folder(vm: Any, folder: str) -> bool:
    node = vm.parent
    while node is not None:
        if getattr(node, "name", None) == folder:
            return True
        node = getattr(node, "parent", None)
    return False


def _port_group(dev: Any, dv_names: Mapping[str, str]) -> str:
    """The port group's name (a distributed one is named by its key in the backing)."""
    backing = dev.backing
    name = getattr(backing, "deviceName", None)
    if name:
        return str(name)
    key = str(getattr(getattr(backing, "port", None), "portgroupKey", "") or "")
    return dv_names.get(key, key)


def _dv_names(vm: Any) -> dict[str, str]:
    """Distributed port group key -> name, for the networks a VM is on."""
    return {str(n.key): str(n.name) for n in vm.network or () if hasattr(n, "key")}
