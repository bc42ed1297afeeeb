"""vSphere as a DR site: qcow2 replica chains on a datastore, flat VMDKs at failover.

Replicas live in `standby/replicas/<protection>-<vm>/` on the site's `datastore`, which
standby reaches as files at `datastore_path` (an NFS datastore mounted on the DR data mover).
Each cycle writes a new qcow2 overlay on top of the previous point through a local
qemu-storage-daemon (`mover.py`); committed, the overlay is never written again: it is the
recovery point. ESXi cannot run qcow2, so a failover converts the chosen point into flat
VMDKs (raw extent + descriptor, holes kept) in a folder of its own and creates the VM there;
a failback onto the original VM (shut down at this site) swaps its disks instead, keeping
its identity. Everything a failover creates carries `standby.failover = <id>` in extraConfig.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar

from standby.core.config import Site
from standby.core.errors import (
    ConfigError,
    NotFound,
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

from . import conn, placement, vmdk
from .conn import FAILOVER_KEY, REPLICA_KEY, VMwareOptions, vim_errors, wait_task
from .mover import Mover
from .reader import DatastorePath, HttpFlatReader

MAX_VMDK = 62 << 40  # vSphere's largest virtual disk: 62 TiB
CONVERT_THREADS = 4
ORIGINAL = "original.json"  # in a seeded replica's folder: the VM a failback goes onto


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]


class VMwareWriter(OverlayWriter):
    """Writes one cycle's overlays through the data mover's NBD exports."""

    def __init__(
        self,
        target: VMwareTarget,
        files: dict[str, Path],
        mover: Mover,
        pool: NbdPool,
        cycle_id: int,
    ) -> None:
        super().__init__(files, pool, cycle_id)
        self.target, self.mover = target, mover

    def failed(self, disk: str, what: str, exc: Exception) -> StandbyError:
        if getattr(exc, "errno", None) == errno.ENOSPC:
            return PluginError(
                f"datastore '{self.target.opts.datastore}' is full: the replica of disk "
                f"'{disk}' cannot grow ({what})"
            )
        return super().failed(disk, what, exc)

    def commit_point(self, point_id: int, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if not self.committed:
            self.pool.flush()
            self.pool.close()
            self.mover.stop()
            self.committed = True
        return self.ref()


class VMwareTarget(Target):
    """A vCenter datacenter at the DR site, with a datastore standby can reach as files."""

    plugin_name = "vmware"
    capabilities: ClassVar[TargetCapabilities] = TargetCapabilities(
        test_failover=True,
        max_disks=placement.UNITS_PER_CONTROLLER * placement.MAX_CONTROLLERS,
        max_disk_size=MAX_VMDK,
        alignment=512,
        max_write=32 << 20,
        max_parallel_writes=4,
        write_proof="found in the replica overlay's allocation map (its qcow2 L2 tables)",
    )

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self.opts = site.options(VMwareOptions)
        self.si: Any = None
        self.dc: Any = None
        self.ds: Any = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        from . import mover

        try:
            import nbd  # noqa: F401
            import pyVmomi  # noqa: F401
        except ImportError as exc:
            return f"{exc.name} is not installed"
        return mover.unavailable_reason()

    # ------------------------------------------------------------ connection

    def connect(self) -> None:
        if self.si is not None:
            return
        for key in ("datastore", "datastore_path"):
            if getattr(self.opts, key) is None:
                raise RoleNotConfigured(
                    f"{self.site.path}: missing key '{key}' (needed for a target)"
                )
        root = self.root()
        if not root.is_dir():
            raise ConfigError(f"{self.site.path}: datastore_path {root} is not a directory")
        si, dc = conn.open_datacenter(self.opts, self.site.name)
        try:
            with vim_errors(f"site '{self.site.name}': datastores"):
                stores = {d.name: d for d in dc.datastore}
            ds = stores.get(str(self.opts.datastore))
            if ds is None:
                names = ", ".join(sorted(stores)) or "none"
                raise NotFound(
                    f"site '{self.site.name}': datastore '{self.opts.datastore}' not found "
                    f"(datacenter '{self.opts.datacenter}' has: {names})"
                )
            self._same_datastore(si)
        except BaseException:
            conn.disconnect(si)
            raise
        self.si, self.dc, self.ds = si, dc, ds

    def _same_datastore(self, si: Any) -> None:
        """Refuse a `datastore_path` that is not the datastore vCenter calls `datastore`: a
        marker written there must read back through vCenter's datastore file service."""
        token = secrets.token_hex(16)
        rel = f"standby/.standby-probe-{token}"
        marker = self.root() / rel
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
        reader = HttpFlatReader(self.opts, self.opts.datacenter, si._stub.cookie)
        try:
            seen = reader.read(DatastorePath(str(self.opts.datastore), rel), 0, len(token))
        except StandbyError:
            seen = b""
        finally:
            reader.close()
            marker.unlink(missing_ok=True)
        if seen != token.encode():
            raise ConfigError(
                f"{self.site.path}: datastore_path {self.root()} is not datastore "
                f"'{self.opts.datastore}' (a file written there is not seen through vCenter)"
            )

    def close(self) -> None:
        if self.si is not None:
            conn.disconnect(self.si)
            self.si = self.dc = self.ds = None

    def check(self) -> list[str]:
        self.connect()
        with vim_errors(f"vCenter {self.opts.host}"):
            product = self.si.content.about.fullName
            free = int(self.ds.summary.freeSpace)
        return [
            f"connected to {product} at {self.opts.host}",
            f"datastore {self.opts.datastore} ({self.root()}): {free >> 30} GiB free",
        ]

    # ------------------------------------------------------------ layout

    def root(self) -> Path:
        return Path(str(self.opts.datastore_path))

    def vm_dir(self, pinfo: ProtectionInfo) -> Path:
        return self.root() / "standby" / "replicas" / f"{pinfo.id}-{_safe(pinfo.vm.name)}"

    def cycle_file(self, pinfo: ProtectionInfo, disk: str, cycle_id: int) -> Path:
        return self.vm_dir(pinfo) / f"{disk}.c{cycle_id:06d}.qcow2"

    def failover_rel(self, pinfo: ProtectionInfo, failover_id: int, test: bool) -> str:
        """A failover's folder, relative to the datastore (outside the replica folder, so that
        unprotecting never deletes a VM that runs)."""
        kind = "tests" if test else "failovers"
        return f"standby/{kind}/{pinfo.id}-{failover_id}-{_safe(pinfo.vm.name)}"

    def mover(self, pinfo: ProtectionInfo) -> Mover:
        key = hashlib.sha1(str(self.vm_dir(pinfo)).encode()).hexdigest()[:12]
        return Mover(Path(tempfile.gettempdir()) / "standby-mover", f"m-{key}")

    def test_name(self, pinfo: ProtectionInfo) -> str:
        return f"{pinfo.vm.name}-test"

    # ------------------------------------------------------------ protect

    def validate(self, vm: VMSpec) -> Validation:
        problems: list[str] = []
        notes: list[str] = []
        caps = self.capabilities
        if len(vm.disks) > caps.max_disks:
            problems.append(f"{len(vm.disks)} disks; this target takes at most {caps.max_disks}")
        for disk in vm.disks:
            if disk.size > caps.max_disk_size:
                problems.append(
                    f"disk {disk.name} is {disk.size >> 30} GiB; vSphere's limit is "
                    f"{caps.max_disk_size >> 30} GiB"
                )
        self.connect()
        problems += self._space_problems(vm)
        problems += self._placement_problems(vm, notes)
        if vm.firmware is Firmware.UEFI:
            notes.append("UEFI VM: created with firmware=efi (hardware version 13 or later)")
        cpus, mem = vm.cpus, vm.memory_mib
        return Validation(problems=problems, size=f"{cpus}vcpu-{mem}MiB", notes=notes)

    def _space_problems(self, vm: VMSpec) -> list[str]:
        need = sum(d.size for d in vm.disks)
        with vim_errors(f"site '{self.site.name}': datastore"):
            reported = int(self.ds.summary.freeSpace)
        st = os.statvfs(self.root())
        free = min(reported, st.f_bavail * st.f_frsize)
        if need <= free:
            return []
        return [
            f"disks need up to {need / (1 << 30):.1f} GiB but datastore "
            f"'{self.opts.datastore}' has {free / (1 << 30):.1f} GiB free"
        ]

    def _placement_problems(self, vm: VMSpec, notes: list[str]) -> list[str]:
        problems: list[str] = []
        try:
            cluster = placement.find_cluster(self.dc, self.opts, self.site.name)
            placement.find_pool(cluster, self.opts, self.site.name)
            placement.pick_host(cluster, self.site.name)
        except NotFound as exc:
            problems.append(str(exc).split(": ", 1)[-1])
        if self.opts.folder and placement.find_folder(self.dc, self.opts, False, "") is None:
            notes.append(f"VM folder '{self.opts.folder}' will be created at the first failover")
        with vim_errors(f"site '{self.site.name}': networks"):
            nets = placement.networks_by_name(self.dc)
        for nic in vm.nics:
            group = placement.port_group_for(self.opts, nic.network, None)
            if group not in nets:
                problems.append(
                    f"NIC {nic.name} on network '{nic.network}' has no port group at "
                    f'\'{self.site.name}\' (map it: networks."{nic.network}" = "<port group>")'
                )
        return problems

    def prepare(self, protection: ProtectionInfo) -> None:
        self.vm_dir(protection).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ cycles

    @contextmanager
    def open_writer(
        self, protection: ProtectionInfo, cycle_id: int, base: PointInfo | None
    ) -> Iterator[ReplicaWriter]:
        self.prepare(protection)
        files = chain.cycle_overlays(
            protection.vm.disks, base, lambda d: self.cycle_file(protection, d, cycle_id)
        )
        mover = self.mover(protection)
        mover.start(files)
        pool = NbdPool(mover.sock, writable=True)
        writer = VMwareWriter(self, files, mover, pool, cycle_id)
        try:
            yield writer
        finally:
            if not writer.committed:
                pool.close()
                mover.stop()

    def discard_pending(self, protection: ProtectionInfo, cycle_id: int) -> None:
        self.mover(protection).stop()
        for disk in protection.vm.disks:
            self.cycle_file(protection, disk.name, cycle_id).unlink(missing_ok=True)

    def prune(
        self, protection: ProtectionInfo, drop: list[PointInfo], keep: list[PointInfo]
    ) -> dict[int, dict[str, Any]]:
        return chain.prune(drop, keep)

    # ------------------------------------------------------------ failover

    def _vms(self) -> list[tuple[Any, Any]]:
        """Every VM of the datacenter with its config."""
        from pyVmomi import vim

        with vim_errors(f"site '{self.site.name}': inventory"):
            view = self.si.content.viewManager.CreateContainerView(
                self.dc.vmFolder, [vim.VirtualMachine], True
            )
            try:
                return [(vm, vm.config) for vm in view.view if vm.config is not None]
            finally:
                view.Destroy()

    def _lookup(self, name: str, instance_uuid: str | None = None) -> tuple[Any, Any] | None:
        """A VM and its config by instance UUID, else by name (one inventory listing)."""
        vms = self._vms()
        by_id = (v for v in vms if instance_uuid and v[1].instanceUuid == instance_uuid)
        return next(by_id, None) or next((v for v in vms if v[1].name == name), None)

    def _convert(self, point: PointInfo, pinfo: ProtectionInfo, rel: str) -> list[tuple[str, int]]:
        """The point's disks as flat VMDKs in folder `rel`: `[ds] path.vmdk` and size each."""
        files = dict(point.ref.get("files", {}))
        folder = self.root() / rel
        folder.mkdir(parents=True, exist_ok=True)
        jobs = []
        for disk in pinfo.vm.disks:
            if disk.name not in files:
                raise PluginError(f"point {point.id} has no replica of disk {disk.name}")
            size = int(point.disks.get(disk.name, disk.size))
            fmt = point.ref.get("formats", {}).get(disk.name, "qcow2")
            jobs.append((disk.name, files[disk.name], fmt, size))

        def one(job: tuple[str, str, str, int]) -> tuple[str, int]:
            name, src, fmt, size = job
            flat = folder / f"{name}-flat.vmdk"
            self.step(f"writing disk {name} ({size >> 20} MiB) as a flat VMDK")
            chain.qemu_img("convert", "-q", "-W", "-m", "8", "-f", fmt, "-O", "raw",
                           "-S", "64k", src, str(flat))  # fmt: skip
            vmdk.write_descriptor(folder / f"{name}.vmdk", size, "pvscsi")
            return f"[{self.opts.datastore}] {rel}/{name}.vmdk", size

        with ThreadPoolExecutor(min(CONVERT_THREADS, max(1, len(jobs)))) as pool:
            return list(pool.map(one, jobs))

    def _nets(self, pinfo: ProtectionInfo, test: bool, network: str | None) -> list[Any]:
        cluster = placement.find_cluster(self.dc, self.opts, self.site.name)
        if test:
            if not pinfo.vm.nics:
                return []
            self.step(f"isolated port group '{self.opts.test_network}' (vSwitch without uplink)")
            iso = placement.isolated_network(self.dc, cluster, self.opts, self.site.name)
            return [iso for _ in pinfo.vm.nics]
        with vim_errors(f"site '{self.site.name}': networks"):
            nets = placement.networks_by_name(self.dc)
        out = []
        for nic in pinfo.vm.nics:
            group = placement.port_group_for(self.opts, nic.network, network)
            if group not in nets:
                raise ConfigError(
                    f"site '{self.site.name}': no port group '{group}' for NIC {nic.name}"
                )
            out.append(nets[group])
        return out

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
        """Test: `<vm>-test` on the isolated port group, tagged as a replica (never listed as a
        source VM). Real: a VM named like the source on the mapped port groups with the
        chosen size; a shut-down VM of that name here (the original, on failback) gets its
        disks swapped to the point's and keeps its identity."""
        self.connect()
        fid = failover_id or 0
        vm = protection.vm
        what = f"failover of {vm.name}"
        original = None if test else self._original(protection)
        if original is not None:  # a failback: the VM this replica was seeded from
            found = self._lookup(original.get("name", ""), original.get("instanceUuid"))
        else:
            found = self._lookup(self.test_name(protection) if test else vm.name)
        name = found[1].name if found else self.test_name(protection) if test else vm.name
        if found is not None:
            obj, cfg = found
            done = placement.created_by(cfg, fid) or placement.swapped_by(cfg, fid)
            if not test and done:  # made before an interruption
                placement.power_on(obj, what, self.opts.task_timeout)
                return self._result(protection, point, obj, name, fid, test)
            if test or str(obj.runtime.powerState) != "poweredOff":
                raise ConfigError(f"a VM named '{name}' already exists at '{self.site.name}'")
        rel = self.failover_rel(protection, fid, test)
        swapped = False
        try:
            disks = self._convert(point, protection, rel)
            if found is not None:
                obj = self._swap_disks(found[0], found[1], disks, fid, what)
                swapped = True  # the original now runs on `rel`: it stays, whatever follows
            else:
                obj = self._create(protection, name, rel, disks, test, network, size, fid)
            self.step(f"powering on {name}")
            placement.power_on(obj, what, self.opts.task_timeout)
        except BaseException:
            if found is None:
                with suppress(StandbyError):
                    self._drop_created(fid)
            if not swapped:
                shutil.rmtree(self.root() / rel, ignore_errors=True)
            raise
        return self._result(protection, point, obj, name, fid, test)

    def _create(
        self,
        pinfo: ProtectionInfo,
        name: str,
        rel: str,
        disks: list[tuple[str, int]],
        test: bool,
        network: str | None,
        size: str | None,
        fid: int,
    ) -> Any:
        cluster = placement.find_cluster(self.dc, self.opts, self.site.name)
        pool = placement.find_pool(cluster, self.opts, self.site.name)
        host = placement.pick_host(cluster, self.site.name)
        folder = placement.find_folder(self.dc, self.opts, True, self.site.name)
        assert folder is not None
        nets = self._nets(pinfo, test, network)
        tags = {FAILOVER_KEY: str(fid)}
        if test:
            tags[REPLICA_KEY] = "test-failover"
        spec = placement.config_spec(
            pinfo.vm,
            name,
            f"[{self.opts.datastore}] {rel}/",
            disks,
            nets,
            size=placement.parse_size(size, pinfo.vm),
            tags=tags,
            keep_macs=not test,
        )
        self.step(f"creating VM {name} on host {host.name}")
        what = f"create VM '{name}'"
        with vim_errors(what):
            task = folder.CreateVM_Task(config=spec, pool=pool, host=host)
        return wait_task(task, what, self.opts.task_timeout)

    def _swap_disks(
        self, obj: Any, cfg: Any, disks: list[tuple[str, int]], fid: int, what: str
    ) -> Any:
        """Failback onto the original VM: its disks, in order, now back onto the point's flat
        VMDKs (the old ones stay where they are: standby never deletes disks it did not make)."""
        from pyVmomi import vim

        current = [d for d in cfg.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
        if len(current) != len(disks):
            raise ConfigError(
                f"the VM '{cfg.name}' at '{self.site.name}' has {len(current)} disks, the point "
                f"{len(disks)}: it is not the original of this VM"
            )
        self.step(f"switching the disks of the original VM {cfg.name} to the point's")
        changes = []
        for dev, (path, nbytes) in zip(current, disks, strict=True):
            assert dev.backing is not None
            dev.backing.fileName = path
            dev.backing.datastore = self.ds
            dev.capacityInKB, dev.capacityInBytes = nbytes // 1024, nbytes  # type: ignore[assignment]
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="edit", device=dev))
        spec = vim.vm.ConfigSpec(
            deviceChange=changes,
            extraConfig=[vim.option.OptionValue(key=FAILOVER_KEY, value=f"{fid}:original")],
        )
        with vim_errors(what):
            task = obj.ReconfigVM_Task(spec=spec)
        wait_task(task, what, self.opts.task_timeout)
        return obj

    def _drop_created(self, fid: int) -> None:
        """Delete the VMs a failover created (not an original it reconfigured)."""
        for obj, cfg in self._vms():
            if placement.created_by(cfg, fid):
                placement.destroy(obj, f"remove VM '{cfg.name}'", self.opts.task_timeout)

    def _result(
        self, pinfo: ProtectionInfo, point: PointInfo, obj: Any, name: str, fid: int, test: bool
    ) -> FailoverResult:
        rel = self.failover_rel(pinfo, fid, test)
        where = "isolated port group, source untouched" if test else "mapped port groups"
        with vim_errors(f"VM '{name}'"):
            moref = str(obj._moId)
        return FailoverResult(
            ref={
                "vm": moref,
                "name": name,
                "dir": str(self.root() / rel),
                "files": {
                    d.name: str(self.root() / rel / f"{d.name}-flat.vmdk") for d in pinfo.vm.disks
                },
                "addresses": [],
            },
            vm_name=name,
            summary=f"{name} running at '{self.site.name}' from point {point.id} ({where})",
        )

    def cleanup_test(self, protection: ProtectionInfo, ref: Mapping[str, Any]) -> None:
        """Remove a test failover's VM and folder, or what a real failover that failed made."""
        self.connect()
        fid = int(ref.get("failover_id") or 0)
        test = ref.get("kind", "test") == "test"
        for obj, cfg in self._vms():
            ours = placement.created_by(cfg, fid) and placement.is_replica(cfg) == test
            named = test and cfg.name == ref.get("name") and placement.is_replica(cfg)
            if ours or named:
                self.step(f"removing VM {cfg.name}")
                placement.destroy(obj, f"remove VM '{cfg.name}'", self.opts.task_timeout)
        if test:
            shutil.rmtree(
                self.root() / self.failover_rel(protection, fid, True), ignore_errors=True
            )

    def commit_failover(
        self,
        protection: ProtectionInfo,
        ref: Mapping[str, Any],
        point: PointInfo,
        released: list[PointInfo],
    ) -> None:
        """The failed-over VM runs on its own flat VMDKs: the replica chain serves nothing
        now, so every point's files go (the point itself stays in the record)."""
        self.mover(protection).stop()
        shutil.rmtree(self.vm_dir(protection), ignore_errors=True)

    def seed(self, protection: ProtectionInfo, original: VMSpec) -> dict[str, Any] | None:
        """The original VM's flat disks (it must be shut down) as the base of the new replica;
        None when they are not flat disks on this site's datastore."""
        from pyVmomi import vim

        self.connect()
        found = self._lookup(original.name, original.id)
        if found is None:
            return None
        obj, cfg = found
        if str(obj.runtime.powerState) != "poweredOff":
            raise ConfigError(
                f"the original VM '{original.name}' is running at '{self.site.name}'; shut it "
                "down before re-protecting towards it"
            )
        devs = [d for d in cfg.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
        if len(devs) != len(protection.vm.disks):
            return None
        files: dict[str, str] = {}
        for disk, dev in zip(protection.vm.disks, devs, strict=True):
            where = DatastorePath.parse(str(getattr(dev.backing, "fileName", "") or "[] -"))
            if where.datastore != self.opts.datastore:
                return None
            extent = vmdk.extent_file(self.root() / where.path)
            if extent is None or extent[1] != disk.size or not extent[0].exists():
                return None
            files[disk.name] = str(extent[0])
        self.prepare(protection)
        marker = self.vm_dir(protection) / ORIGINAL
        marker.write_text(json.dumps({"instanceUuid": cfg.instanceUuid, "name": cfg.name}))
        return {
            "files": files,
            "formats": {d: "raw" for d in files},
            "seed": True,
        }

    def _original(self, pinfo: ProtectionInfo) -> dict[str, str] | None:
        """The original VM a re-protect towards this site was seeded from (`name`,
        `instanceUuid`): a failback goes back onto it, whatever name the VM ran under
        elsewhere."""
        try:
            known = json.loads((self.vm_dir(pinfo) / ORIGINAL).read_text())
        except (OSError, ValueError):
            return None
        return {str(k): str(v) for k, v in known.items()} if isinstance(known, dict) else None

    def remove(self, protection: ProtectionInfo, points: list[PointInfo]) -> None:
        self.mover(protection).stop()
        shutil.rmtree(self.vm_dir(protection), ignore_errors=True)
