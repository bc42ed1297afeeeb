"""libvirt as a DR site: qcow2 replica chains, written over NBD through a paused appliance.

Each cycle writes into a new qcow2 overlay on top of the previous point. A paused,
disk-only QEMU domain (the "replica appliance") opens the overlays and exports them as
writable NBD through QMP, so data reaches the target host only through libvirt and NBD. When
the cycle commits, the appliance is destroyed and the overlay is never written again: it is
the recovery point. Pruning merges a dropped point's successor into it (cost: one cycle's
changes). Failover starts a domain whose disks are new overlays on the chosen point.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar

from standby.core.errors import (
    CapabilityNotSupported,
    ConfigError,
    PluginError,
    RoleNotConfigured,
    StandbyError,
)
from standby.core.imagefiles import chain
from standby.core.imagefiles.nbd import NbdPool
from standby.core.imagefiles.writer import OverlayWriter
from standby.core.interfaces import ReplicaWriter, Target, TargetCapabilities
from standby.core.model import (
    FailoverResult,
    Firmware,
    PointInfo,
    ProtectionInfo,
    Validation,
    VMSpec,
)
from standby.core.vault.seal import site_sealer
from standby.plugins.physical import conn as lv
from standby.plugins.physical.domxml import (
    bus_for,
    disk_sources,
    firmware_kinds,
    guest_devs,
    swap_disks,
)

QCOW2_MAX = 64 << 40  # 64 TiB: what this target accepts per disk
TEST_NETWORK = "standby-test"


class PhysicalWriter(OverlayWriter):
    """Writes one cycle's overlays through the appliance's NBD exports."""

    def __init__(
        self,
        target: PhysicalTarget,
        pinfo: ProtectionInfo,
        cycle_id: int,
        files: dict[str, Path],
        dom: Any,
        pool: NbdPool,
    ) -> None:
        super().__init__(files, pool, cycle_id)
        self.target = target
        self.pinfo = pinfo
        self.dom = dom

    def commit_point(self, point_id: int, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if not self.committed:
            self.pool.flush()
            self.target._stop_appliance(self.pinfo, self.dom, self.pool)
            self.committed = True
        ref = self.ref()
        self.target.write_point_record(self.pinfo, point_id, meta, ref)
        return ref


class PhysicalTarget(lv.LibvirtPlugin, Target):
    """A libvirt host (embedded or local daemon) keeping replicas in a directory."""

    plugin_name = "physical"
    capabilities: ClassVar[TargetCapabilities] = TargetCapabilities(
        test_failover=True,
        max_disks=26,
        max_disk_size=QCOW2_MAX,
        alignment=512,
        max_write=32 << 20,
        max_parallel_writes=4,
        write_proof="found in the replica overlay's allocation map (its qcow2 L2 tables)",
    )

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return lv.unavailable_reason() or (
            None if shutil.which("qemu-img") else "qemu-img is not installed (qemu-utils)"
        )

    def connect(self) -> None:
        if self.opts.pool_dir is None:
            raise RoleNotConfigured(
                f"{self.site.path}: missing key 'pool_dir' (needed for a target)"
            )
        if not self.opts.is_local():
            raise CapabilityNotSupported(
                f"site '{self.site.name}': remote libvirt targets are not supported yet; "
                "run standby on the DR host (qemu:///system or qemu:///embed)"
            )
        super().connect()

    def check(self) -> list[str]:
        self.connect()
        pool = self.pool_root()
        pool.mkdir(parents=True, exist_ok=True)
        st = os.statvfs(pool)
        return [
            f"libvirt {self.conn.getLibVersion()} at {self.conn.getURI()}",
            f"replica directory {pool}: {st.f_bavail * st.f_frsize >> 30} GiB free",
        ]

    # ------------------------------------------------------------ layout

    def pool_root(self) -> Path:
        assert self.opts.pool_dir is not None
        return Path(self.opts.pool_dir)

    def write_point_record(
        self, pinfo: ProtectionInfo, point_id: int, meta: Mapping[str, Any] | None, ref: Any
    ) -> None:
        """With a `vault` named: the point's record (VM spec, the engine's meta, the files),
        sealed with the vault's key, beside the replicas (`point-ID.sbv`)."""
        sealer = site_sealer(self.site.path.parent.parent, self.opts.vault)
        if sealer is None:
            return
        record = {"vm": pinfo.vm.to_dict(), "meta": dict(meta or {}), "ref": ref}
        blob = sealer.seal_json("kvm-point", f"{pinfo.id}/{point_id}", record)
        path = self.vm_dir(pinfo) / f"point-{point_id}.sbv"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)

    def vm_dir(self, pinfo: ProtectionInfo) -> Path:
        return self.pool_root() / f"{pinfo.id}-{pinfo.vm.name}"

    def cycle_file(self, pinfo: ProtectionInfo, disk: str, cycle_id: int) -> Path:
        return self.vm_dir(pinfo) / f"{disk}.c{cycle_id:06d}.qcow2"

    def appliance_name(self, pinfo: ProtectionInfo) -> str:
        return f"standby-replica-{pinfo.id}"

    def test_name(self, pinfo: ProtectionInfo) -> str:
        return f"{pinfo.vm.name}-test"

    # ------------------------------------------------------------ protect

    def validate(self, vm: VMSpec) -> Validation:
        problems: list[str] = []
        notes: list[str] = []
        if len(vm.disks) > self.capabilities.max_disks:
            problems.append(
                f"{len(vm.disks)} disks; this target takes at most {self.capabilities.max_disks}"
            )
        for disk in vm.disks:
            if disk.size > self.capabilities.max_disk_size:
                problems.append(
                    f"disk {disk.name} is {disk.size >> 30} GiB; the limit is "
                    f"{self.capabilities.max_disk_size >> 30} GiB"
                )
        pool = self.pool_root()
        probe = pool if pool.exists() else next((p for p in pool.parents if p.exists()), Path("/"))
        st = os.statvfs(probe)
        free = st.f_bavail * st.f_frsize
        need = sum(d.size for d in vm.disks)
        if need > free:
            problems.append(
                f"disks need up to {need / (1 << 30):.1f} GiB but the target pool {pool} has "
                f"{free / (1 << 30):.1f} GiB free"
            )
        if vm.firmware is Firmware.UEFI:
            machine = str(vm.extra.get("machine", "pc"))
            try:
                with lv.libvirt_errors(f"site '{self.site.name}': domain capabilities"):
                    caps: str | None = self.conn.getDomainCapabilities(
                        None, "x86_64", machine, self.opts.domain_type
                    )
            except StandbyError as exc:  # the host could not say: check again at failover
                caps = None
                notes.append(f"UEFI VM: could not ask the DR host for UEFI firmware ({exc})")
            if caps is not None and "efi" not in firmware_kinds(caps):
                problems.append(
                    f"the VM boots with UEFI (generation 2) but the DR host '{self.site.name}' "
                    "has no UEFI firmware for QEMU (install ovmf there)"
                )
        return Validation(problems=problems, size=f"{vm.cpus}vcpu-{vm.memory_mib}MiB", notes=notes)

    def prepare(self, protection: ProtectionInfo) -> None:
        """The replica directory, and the replica appliance (so the first cycle finds it up)."""
        self._dirs(protection)
        self._appliance(protection)

    def _dirs(self, protection: ProtectionInfo) -> None:
        self.vm_dir(protection).mkdir(parents=True, exist_ok=True)
        self.opts.work_path().mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ appliance

    def _destroy(self, name: str) -> None:
        libvirt = lv.libvirt_module()
        try:
            dom = self.conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError:
            pass
        with suppress(libvirt.libvirtError):
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)

    def _qmp(self, dom: Any, command: str, **arguments: Any) -> Any:
        with lv.libvirt_errors(f"replica appliance: {command}"):
            reply = lv.qmp(dom, command, **arguments)
        if "error" in reply:
            raise PluginError(f"replica appliance: {command}: {reply['error'].get('desc')}")
        return reply.get("return")

    def _appliance(self, pinfo: ProtectionInfo) -> tuple[Any, Path]:
        """The protection's replica appliance: a paused, device-less QEMU kept between cycles
        (starting and stopping one costs ~2 s), with its NBD server up and nothing open."""
        libvirt = lv.libvirt_module()
        name = self.appliance_name(pinfo)
        sock = self.opts.work_path() / f"replica-{pinfo.id}.sock"
        dom = None
        with suppress(libvirt.libvirtError):
            found = self.conn.lookupByName(name)
            if found.isActive():
                dom = found
        if dom is not None:
            try:
                self._close_nodes(dom)
            except StandbyError:
                self._destroy(name)
                dom = None
        if dom is None:
            xml = (
                f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory>"
                "<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os>"
                "<devices><memballoon model='none'/></devices></domain>"
            )
            with lv.libvirt_errors(f"target '{self.site.name}': replica appliance"):
                dom = self.conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
            sock.unlink(missing_ok=True)
            self._qmp(dom, "nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        return dom, sock

    def _close_nodes(self, dom: Any) -> None:
        """Remove every export and replica node (flushing and closing their files)."""
        for export in self._qmp(dom, "query-block-exports") or []:
            with suppress(PluginError):
                self._qmp(dom, "block-export-del", id=export["id"], mode="hard")
        deadline = time.monotonic() + 10
        while self._qmp(dom, "query-block-exports"):
            if time.monotonic() > deadline:
                raise PluginError("replica appliance: exports do not go away")
            time.sleep(0.02)
        for node in self._qmp(dom, "query-named-block-nodes", flat=True) or []:
            if str(node.get("node-name", "")).startswith("replica-"):
                self._qmp(dom, "blockdev-del", **{"node-name": node["node-name"]})

    def _open_nodes(self, dom: Any, files: dict[str, Path]) -> None:
        for disk, path in files.items():
            node = f"replica-{disk}"
            # Opened by QEMU itself (no guest device), backing chain from the qcow2 header.
            self._qmp(
                dom,
                "blockdev-add",
                driver="qcow2",
                **{"node-name": node},
                discard="unmap",
                file={"driver": "file", "filename": str(path)},
            )
            self._qmp(
                dom,
                "block-export-add",
                type="nbd",
                id=f"export-{disk}",
                **{"node-name": node},
                name=disk,
                writable=True,
            )

    def _stop_appliance(self, pinfo: ProtectionInfo, dom: Any, pool: NbdPool) -> None:
        """End a cycle's session: flush and close the overlays; the appliance stays up."""
        pool.close()
        self._close_nodes(dom)

    @contextmanager
    def open_writer(
        self, protection: ProtectionInfo, cycle_id: int, base: PointInfo | None
    ) -> Iterator[ReplicaWriter]:
        self._dirs(protection)
        dom, sock = self._appliance(protection)
        files = chain.cycle_overlays(
            protection.vm.disks, base, lambda d: self.cycle_file(protection, d, cycle_id)
        )
        pool = NbdPool(sock, writable=True)
        writer = PhysicalWriter(self, protection, cycle_id, files, dom, pool)
        try:
            self._open_nodes(dom, files)
            yield writer
        finally:
            if not writer.committed:
                self._stop_appliance(protection, dom, pool)

    def discard_pending(self, protection: ProtectionInfo, cycle_id: int) -> None:
        self._destroy(self.appliance_name(protection))
        for disk in protection.vm.disks:
            self.cycle_file(protection, disk.name, cycle_id).unlink(missing_ok=True)

    # ------------------------------------------------------------ retention

    def prune(
        self, protection: ProtectionInfo, drop: list[PointInfo], keep: list[PointInfo]
    ) -> dict[int, dict[str, Any]]:
        return chain.prune(drop, keep)

    # ------------------------------------------------------------ failover

    def _has_networks(self) -> bool:
        libvirt = lv.libvirt_module()
        try:
            self.conn.listAllNetworks()
            return True
        except libvirt.libvirtError:
            return False

    def _isolated_nics(self, vm: VMSpec, pinfo: ProtectionInfo) -> str:
        """NICs with no uplink: an isolated libvirt network, or (embedded libvirt, which has
        no network driver) a UDP link to a loopback port nobody listens on."""
        if self._has_networks():
            libvirt = lv.libvirt_module()
            try:
                self.conn.networkLookupByName(TEST_NETWORK)
            except libvirt.libvirtError:
                with lv.libvirt_errors("isolated test network"):
                    net = self.conn.networkDefineXML(
                        f"<network><name>{TEST_NETWORK}</name><bridge name='sbtest0'/></network>"
                    )
                    net.create()
            return "".join(
                f"<interface type='network'><mac address='{n.mac}'/>"
                f"<source network='{TEST_NETWORK}'/><model type='{n.model}'/></interface>"
                for n in vm.nics
            )
        base = 40000 + (pinfo.id * 16) % 20000
        return "".join(
            f"<interface type='udp'><mac address='{n.mac}'/><source address='127.0.0.1' "
            f"port='{base + 2 * i}'><local address='127.0.0.1' port='{base + 2 * i + 1}'/>"
            f"</source><model type='{n.model}'/></interface>"
            for i, n in enumerate(vm.nics)
        )

    def _mapped_nics(self, vm: VMSpec, network: str | None) -> str:
        out = []
        for n in vm.nics:
            net = network or self.opts.networks.get(n.network) or n.network
            out.append(
                f"<interface type='network'><mac address='{n.mac}'/><source network='{net}'/>"
                f"<model type='{n.model}'/></interface>"
            )
        return "".join(out)

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
        """A domain on fresh overlays over the point's files.

        Test: `<vm>-test`, NICs without uplink, a console socket. Real (planned/unplanned):
        a domain named like the VM with its UUID and MACs on the mapped networks; a shut-off
        domain of that name (the VM's original definition, on failback) gets its disks
        switched to the overlays and keeps everything else.
        """
        vm = protection.vm
        name = self.test_name(protection) if test else vm.name
        libvirt = lv.libvirt_module()
        fdir = self.vm_dir(protection) / (
            "test-failover" if test else f"failover-{failover_id or 0}"
        )
        existing = None
        try:
            existing = self.conn.lookupByName(name)
        except libvirt.libvirtError:
            pass
        if existing is not None:
            xml = existing.XMLDesc(0)
            if str(fdir) in xml and not test:  # made by this failover before an interruption
                with lv.libvirt_errors(f"failover of {vm.name}"):
                    if not existing.isActive():
                        existing.create()
                return self._result(protection, point, name, fdir, test)
            if test or existing.isActive():
                raise ConfigError(f"a domain named '{name}' already exists at '{self.site.name}'")
        fdir.mkdir(parents=True, exist_ok=True)
        files = dict(point.ref.get("files", {}))
        overlays: dict[str, Path] = {}
        for disk in vm.disks:
            if disk.name not in files:
                raise PluginError(f"point {point.id} has no replica of disk {disk.name}")
            overlay = fdir / f"{disk.name}.qcow2"
            overlay.unlink(missing_ok=True)
            chain.qemu_img(
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                files[disk.name],
                "-F",
                point.ref.get("formats", {}).get(disk.name, "qcow2"),
                str(overlay),
                str(point.disks.get(disk.name, disk.size)),
            )
            overlays[disk.name] = overlay
        if existing is not None:
            xml = swap_disks(existing.XMLDesc(0), overlays)
        else:
            xml = self._domain_xml(protection, name, overlays, test, network)
        with lv.libvirt_errors(f"failover of {vm.name}"):
            dom = self.conn.defineXML(xml)
            try:
                dom.create()
            except Exception:
                if existing is None:
                    with suppress(libvirt.libvirtError):
                        dom.undefine()
                raise
        return self._result(protection, point, name, fdir, test)

    def _domain_xml(
        self,
        protection: ProtectionInfo,
        name: str,
        overlays: Mapping[str, Path],
        test: bool,
        network: str | None,
    ) -> str:
        vm = protection.vm
        devs = guest_devs([d.name for d in vm.disks if d.name in overlays])
        disks_xml = "".join(
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{overlays[disk]}'/><target dev='{dev}' bus='{bus_for(dev)}'/></disk>"
            for disk, dev in devs.items()
        )
        if test:
            nics = self._isolated_nics(vm, protection)
        elif self._has_networks():
            nics = self._mapped_nics(vm, network)
        else:  # embedded libvirt has no network driver: QEMU's own user-mode networking
            nics = "".join(
                f"<interface type='user'><mac address='{n.mac}'/><model type='{n.model}'/>"
                "</interface>"
                for n in vm.nics
            )
        console = self.opts.work_path() / (
            f"console-{protection.id}.sock" if test else f"console-{protection.id}-{name}.sock"
        )
        console.unlink(missing_ok=True)
        uuid = "" if test else f"<uuid>{_domain_uuid(vm.id)}</uuid>"
        return (
            f"<domain type='{self.opts.domain_type}'><name>{name}</name>{uuid}"
            f"<memory unit='MiB'>{vm.memory_mib}</memory><vcpu>{vm.cpus}</vcpu>"
            f"{self._os_xml(vm)}<features><acpi/><apic/></features><on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash>"
            f"<devices>{disks_xml}{nics}"
            f"<serial type='unix'><source mode='bind' path='{console}'/></serial>"
            "<console type='unix'><target type='serial'/></console>"
            "<memballoon model='none'/></devices></domain>"
        )

    def _result(
        self, protection: ProtectionInfo, point: PointInfo, name: str, fdir: Path, test: bool
    ) -> FailoverResult:
        where = "isolated network, source untouched" if test else "mapped networks"
        return FailoverResult(
            ref={
                "domain": name,
                "dir": str(fdir),
                "console": str(
                    self.opts.work_path()
                    / (
                        f"console-{protection.id}.sock"
                        if test
                        else f"console-{protection.id}-{name}.sock"
                    )
                ),
                "files": {d.name: str(fdir / f"{d.name}.qcow2") for d in protection.vm.disks},
                "addresses": [],
            },
            vm_name=name,
            summary=f"{name} running at '{self.site.name}' from point {point.id} ({where})",
        )

    def seed(self, protection: ProtectionInfo, original: VMSpec) -> dict[str, Any] | None:
        """The original domain's disks (it must be shut off) as the base of the new replica."""
        libvirt = lv.libvirt_module()
        try:
            dom = self.conn.lookupByUUIDString(original.id)
        except libvirt.libvirtError:
            try:
                dom = self.conn.lookupByName(original.name)
            except libvirt.libvirtError:
                return None
        with lv.libvirt_errors(f"original VM {original.name}"):
            if dom.isActive():
                raise ConfigError(
                    f"the original VM '{original.name}' is running at '{self.site.name}'; shut "
                    "it down before re-protecting towards it"
                )
            sources = disk_sources(dom.XMLDesc(0))
        files = {d: str(v["file"]) for d, v in sources.items() if v.get("file")}
        names = [d.name for d in protection.vm.disks]
        if all(n in files for n in names):
            devs = dict(zip(names, names, strict=True))
        elif len(files) == len(names):  # the VM came from another platform: disks in order
            devs = dict(zip(names, files, strict=True))
        else:
            return None
        return {
            "files": {n: files[dev] for n, dev in devs.items()},
            "formats": {n: sources[dev].get("format") or "raw" for n, dev in devs.items()},
            "seed": True,
        }

    def commit_failover(
        self,
        protection: ProtectionInfo,
        ref: Mapping[str, Any],
        point: PointInfo,
        released: list[PointInfo],
    ) -> None:
        """The failed-over VM runs on the point's chain: stop the replica appliance and drop
        files of released points that are not in that chain (the newer ones)."""
        self._destroy(self.appliance_name(protection))
        for p in released:
            if p.id > point.id:
                for f in p.ref.get("files", {}).values():
                    Path(f).unlink(missing_ok=True)

    def _os_xml(self, vm: VMSpec) -> str:
        machine = vm.extra.get("machine", "pc")
        fw = " firmware='efi'" if vm.firmware is Firmware.UEFI else ""
        boot = ""
        kernel = vm.extra.get("kernel")
        if kernel and Path(kernel).exists():
            boot = f"<kernel>{kernel}</kernel>"
            if vm.extra.get("initrd"):
                boot += f"<initrd>{vm.extra['initrd']}</initrd>"
            if vm.extra.get("cmdline"):
                boot += f"<cmdline>{vm.extra['cmdline']}</cmdline>"
        else:
            boot = "<boot dev='hd'/>"
        return f"<os{fw}><type arch='x86_64' machine='{machine}'>hvm</type>{boot}</os>"

    def cleanup_test(self, protection: ProtectionInfo, ref: Mapping[str, Any]) -> None:
        if ref.get("kind", "test") != "test":  # a real failover that failed part-way
            shutil.rmtree(
                self.vm_dir(protection) / f"failover-{ref.get('failover_id', 0)}",
                ignore_errors=True,
            )
            return
        self._destroy(str(ref.get("domain") or self.test_name(protection)))
        fdir = Path(ref.get("dir") or self.vm_dir(protection) / "test-failover")
        shutil.rmtree(fdir, ignore_errors=True)
        console = self.opts.work_path() / f"console-{protection.id}.sock"
        console.unlink(missing_ok=True)

    def domain_names(self) -> list[str]:
        with lv.libvirt_errors(f"site '{self.site.name}'"):
            return sorted(d.name() for d in self.conn.listAllDomains())

    def remove(self, protection: ProtectionInfo, points: list[PointInfo]) -> None:
        self._destroy(self.appliance_name(protection))
        self.cleanup_test(protection, {})
        shutil.rmtree(self.vm_dir(protection), ignore_errors=True)


def _domain_uuid(vm_id: str) -> str:
    """The VM's id when it is a UUID (it keeps its identity across sites), else a UUID made
    from it (an EC2 instance id `i-...` is not one)."""
    import uuid

    try:
        return str(uuid.UUID(vm_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"standby:vm:{vm_id}"))
