"""Hyper-V as a DR site: a differencing VHDX per recovery point on the host's share.

Replicas live in `<replica_dir>\\<protection>-<vm>\\` of the site's share. Each cycle writes a
new differencing VHDX over the previous point's file (the first cycle: a plain dynamic VHDX,
or, re-protecting towards the VM's original host, a child of the original VM's own disk);
the engine's writes go straight into it over SMB (`vhdx.VhdxWriter`: blocks appended, BAT
and sector bitmaps written at each flush, after the data). Committed, the file is never
written again: it is the recovery point. Pruning merges a dropped point's successor down
into it (cost: one cycle's changes), relinks the next file and moves the successor's ref.

Failover asks the host (one script) for a VM on fresh differencing disks over the point
(`New-VHD -Differencing`), generation kept, NICs with their MACs on the mapped switches; a
test failover goes to a private switch; a failback goes onto the original VM (shut down),
swapping its disks, so it keeps its identity. Everything a failover makes carries
`standby:failover=<id>;` in its notes.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar

from standby.core.config import Site
from standby.core.errors import ConfigError, NotFound, PluginError
from standby.core.extents import Intervals, normalize, subtract, union
from standby.core.imagefiles import chain
from standby.core.interfaces import (
    Buffer,
    NativeReplication,
    ReplicaWriter,
    Target,
    TargetCapabilities,
)
from standby.core.model import (
    Extent,
    FailoverResult,
    Firmware,
    PointInfo,
    ProtectionInfo,
    Validation,
    VMSpec,
)

from . import files, replica, scripts, smb, vhdx
from .conn import HyperVOptions, PowerShell, as_list
from .inventory import MAX_VHDX
from .smb import SmbPool, SmbShare

ORIGINAL = "original.json"  # in a seeded replica's folder: the VM a failback goes onto
BLOCK = 2 << 20  # payload block of the files standby makes (Hyper-V's own for differencing)
SCSI_SLOTS = 64  # disks per SCSI controller
SLOT = re.compile(r"^(scsi|ide)(\d+)-(\d+)$")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]


def slots(vm: VMSpec, generation: int) -> list[tuple[str, int, int]]:
    """(controller type, number, location) for each disk: the source's own when it is a
    Hyper-V VM that fits this generation, else in order (generation 1: IDE 0:0, 0:1, 1:0,
    1:1 then SCSI; generation 2: SCSI only)."""
    own = [SLOT.match(d.name) for d in vm.disks]
    if all(own) and (generation == 1 or all(m and m.group(1) == "scsi" for m in own)):
        return [(m.group(1).upper(), int(m.group(2)), int(m.group(3))) for m in own if m]
    out: list[tuple[str, int, int]] = []
    ide = [("IDE", 0, 0), ("IDE", 0, 1), ("IDE", 1, 0), ("IDE", 1, 1)] if generation == 1 else []
    for i in range(len(vm.disks)):
        if i < len(ide):
            out.append(ide[i])
        else:
            n = i - len(ide)
            out.append(("SCSI", n // SCSI_SLOTS, n % SCSI_SLOTS))
    return out


class HyperVWriter(ReplicaWriter):
    """One cycle's writes into each disk's pending differencing VHDX."""

    def __init__(self, target: HyperVTarget, files_: dict[str, str]) -> None:
        self.target = target
        self.files = files_  # disk -> host path
        self.stack = ExitStack()
        self.pools: dict[str, SmbPool] = {}
        self.writers: dict[str, vhdx.VhdxWriter] = {}
        self.readers: dict[str, vhdx.VhdxReader] = {}
        self.read_stack = ExitStack()
        self._reading = threading.Lock()
        self.committed = False
        for disk, path in files_.items():
            pool = files.pool(target.opts, path, f"replica of disk {disk}", write=True)
            self.stack.callback(pool.close)
            self.pools[disk] = pool
            self.writers[disk] = vhdx.VhdxWriter.reopen(pool, path, pool.size)

    def write(self, disk: str, offset: int, data: Buffer) -> None:
        self.readers.pop(disk, None)
        self.writers[disk].write(offset, data)

    def write_zeroes(self, disk: str, extent: Extent) -> None:
        self.readers.pop(disk, None)
        self.writers[disk].write_zeroes(extent.offset, extent.length)

    def read(self, disk: str, extent: Extent) -> Buffer:
        with self._reading:
            reader = self.readers.get(disk)
            if reader is None:  # read back what the file says, so its BAT goes first
                self.writers[disk].flush()
                what = f"replica of disk {disk}"
                reader = files.open_chain(self.target.opts, self.files[disk], what, self.read_stack)
                self.readers[disk] = reader
        return reader.read(extent.offset, extent.length)

    def flush(self) -> None:
        for w in self.writers.values():
            w.flush()

    def unproven(self, disk: str, written: Intervals, planned: Intervals) -> Intervals:
        """The pending file is new this cycle: what its BAT and sector bitmaps hold (read
        back from the file after the flush) is exactly what was written. Writes not there,
        and anything held outside the plan, are what a read-back checks."""
        src = self.pools[disk]
        lay = vhdx.open_layout(src, self.files[disk])
        have = normalize(vhdx.VhdxReader.alone(src, self.files[disk], lay).held())
        return union(subtract(written, have), subtract(have, planned))

    def ref(self) -> dict[str, Any]:
        return {"files": dict(self.files), "formats": {d: "vhdx" for d in self.files}}

    def commit_point(self, point_id: int, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if not self.committed:
            self.flush()
            self.close()
            self.committed = True
        return self.ref()

    def close(self) -> None:
        self.read_stack.close()
        self.stack.close()


class HyperVTarget(Target):
    """A Hyper-V host at the DR site, with a share standby writes replica files into."""

    plugin_name = "hyperv"
    capabilities: ClassVar[TargetCapabilities] = TargetCapabilities(
        test_failover=True,
        max_disks=SCSI_SLOTS,
        max_disk_size=MAX_VHDX,
        alignment=512,
        max_write=4 << 20,
        max_parallel_writes=files.CONNECTIONS,
        write_proof="found in the replica VHDX's BAT and sector bitmaps",
    )

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self.opts = site.options(HyperVOptions)
        self.ps = PowerShell(self.opts)
        self._share: SmbShare | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        from .source import HyperVSource

        return HyperVSource.unavailable_reason()

    def connect(self) -> None:
        if not self.opts.share or not self.opts.share_root:
            raise ConfigError(
                f"{self.site.path}: keys 'share' and 'share_root' are needed for a DR site"
            )
        self.ps.connect()

    def close(self) -> None:
        self.ps.close()
        smb.TREES.drain(self.opts.smb_host or self.opts.host)
        if self._share is not None:
            self._share.close()
            self._share = None

    @property
    def share(self) -> SmbShare:
        if self._share is None:
            self.connect()
            self._share = files.share(self.opts)
        return self._share

    def check(self) -> list[str]:
        self.connect()
        switches = [str(s["Name"]) for s in self._switches()]
        self.share.makedirs(self.opts.replica_dir)
        return [
            f"connected to {self.ps.what}",
            f"switches: {', '.join(switches) or 'none'}",
            f"replicas in {self.share.unc(self.opts.replica_dir)}",
        ]

    # ------------------------------------------------------------ layout

    def vm_dir(self, pinfo: ProtectionInfo) -> str:
        """Share-relative folder of a protection's replicas."""
        return f"{self.opts.replica_dir}\\{pinfo.id}-{_safe(pinfo.vm.name)}"

    def cycle_file(self, pinfo: ProtectionInfo, disk: str, cycle_id: int) -> str:
        return f"{self.vm_dir(pinfo)}\\{_safe(disk)}.c{cycle_id:06d}.vhdx"

    def host(self, rel: str) -> str:
        return self.opts.host_path(rel)

    def rel(self, host_path: str) -> str:
        return self.opts.share_path(host_path, f"site '{self.site.name}'")

    def test_name(self, pinfo: ProtectionInfo) -> str:
        return f"{pinfo.vm.name}-test"

    # ------------------------------------------------------------ protect

    def _switches(self) -> list[dict[str, Any]]:
        return list(as_list(self.ps.run(scripts.script("switches", {}, scripts.SWITCHES))))

    def validate(self, vm: VMSpec) -> Validation:
        problems: list[str] = []
        notes: list[str] = []
        if len(vm.disks) > self.capabilities.max_disks:
            problems.append(
                f"{len(vm.disks)} disks; this target takes at most {self.capabilities.max_disks}"
            )
        for disk in vm.disks:
            if disk.size > MAX_VHDX:
                problems.append(
                    f"disk {disk.name} is {disk.size >> 30} GiB; a VHDX holds at most "
                    f"{MAX_VHDX >> 40} TiB"
                )
            if disk.size % vhdx.SECTOR:
                problems.append(f"disk {disk.name} is not a whole number of 512-byte sectors")
        have = {str(s["Name"]) for s in self._switches()}
        for nic in vm.nics:
            want = self.opts.networks.get(nic.network) or nic.network
            if want not in have:
                problems.append(
                    f"NIC {nic.name} is on network '{nic.network}', which has no switch "
                    f"'{want}' at '{self.site.name}' (map it under networks)"
                )
        if vm.extra.get("generation") is None:
            notes.append(
                "the guest needs Hyper-V's storage and network drivers (hv_storvsc, hv_netvsc "
                "or the Windows integration services) to boot there"
            )
        generation = 2 if vm.firmware is Firmware.UEFI else 1
        return Validation(
            problems=problems,
            size=f"gen{generation}-{vm.cpus}vcpu-{vm.memory_mib}MiB",
            notes=notes,
        )

    def prepare(self, protection: ProtectionInfo) -> None:
        self.share.makedirs(self.vm_dir(protection))

    def _parent_link(self, child: str, parent: str) -> dict[str, str]:
        with ExitStack() as stack:
            p = files.pool(self.opts, parent, f"parent {parent}", size=1)
            stack.callback(p.close)
            guid = vhdx.open_layout(p, parent).data_write_guid
        return vhdx.locator_for(child, parent, guid)

    def _new_file(self, rel: str, size: int, parent: str | None) -> None:
        """A complete empty VHDX at `rel`: made under a temporary name, then renamed, so a
        file with the final name always has whole headers, metadata and BAT."""
        tmp = rel + ".tmp"
        self.share.remove(tmp)
        locator = self._parent_link(self.host(rel), parent) if parent else None
        p = files.pool(
            self.opts, self.host(tmp), f"new replica {rel}", write=True, create=True, size=1
        )
        try:
            vhdx.create(p, size, block_size=BLOCK, parent=locator)
        finally:
            p.close()
        self.share.rename(tmp, rel)

    @contextmanager
    def open_writer(
        self, protection: ProtectionInfo, cycle_id: int, base: PointInfo | None
    ) -> Iterator[ReplicaWriter]:
        self.prepare(protection)
        base_files: dict[str, str] = dict(base.ref.get("files", {})) if base else {}
        paths: dict[str, str] = {}
        for disk in protection.vm.disks:
            rel = self.cycle_file(protection, disk.name, cycle_id)
            if not self.share.exists(rel):
                self._new_file(rel, disk.size, base_files.get(disk.name))
            paths[disk.name] = self.host(rel)
        writer = HyperVWriter(self, paths)
        try:
            yield writer
        finally:
            if not writer.committed:
                writer.close()

    def discard_pending(self, protection: ProtectionInfo, cycle_id: int) -> None:
        for disk in protection.vm.disks:
            rel = self.cycle_file(protection, disk.name, cycle_id)
            self.share.remove(rel + ".tmp")
            self.share.remove(rel)

    # ------------------------------------------------------------ retention

    def prune(
        self, protection: ProtectionInfo, drop: list[PointInfo], keep: list[PointInfo]
    ) -> dict[int, dict[str, Any]]:
        return chain.prune(
            drop, keep, exists=lambda f: self.share.exists(self.rel(f)), merge_down=self._merge
        )

    def _merge(self, mine: str, child: str, grandchild: str | None, _fmt: str) -> None:
        """Merge `child` down into `mine`, relink `grandchild` to `mine`, delete `child`."""
        with ExitStack() as stack:
            cp = files.pool(self.opts, child, "prune", size=1)
            stack.callback(cp.close)
            lay = vhdx.open_layout(cp, child)
            mp = files.pool(self.opts, mine, "prune", write=True)
            stack.callback(mp.close)
            vhdx.merge_into_parent(cp, lay, child, vhdx.VhdxWriter.reopen(mp, mine, mp.size))
            if grandchild is not None:
                gp = files.pool(self.opts, grandchild, "prune", write=True, size=1)
                stack.callback(gp.close)
                glay = vhdx.open_layout(gp, grandchild)
                vhdx.relink(gp, glay, vhdx.locator_for(grandchild, mine, lay.data_write_guid))
        self.share.remove(self.rel(child))

    # ------------------------------------------------------------ failover

    def _fdir(self, pinfo: ProtectionInfo, test: bool, failover_id: int) -> str:
        return f"{self.vm_dir(pinfo)}\\" + ("test-failover" if test else f"failover-{failover_id}")

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
        if point.ref.get("native") == replica.KIND:
            return replica.HyperVReplica(self).failover(
                protection, point, test, network, failover_id
            )
        vm = protection.vm
        fid = failover_id or 0
        fdir = self._fdir(protection, test, fid)
        self.share.makedirs(fdir)
        generation = 2 if vm.firmware is Firmware.UEFI else 1
        original = None if test else self._original(protection)
        where = slots(vm, generation)
        if original is not None:
            known = original.get("slots", {})
            where = [
                tuple(known[d.name]) if d.name in known else w
                for d, w in zip(vm.disks, where, strict=True)
            ]
        files_ = dict(point.ref.get("files", {}))
        disks = []
        made: dict[str, str] = {}
        for disk, (kind, number, location) in zip(vm.disks, where, strict=True):
            if disk.name not in files_:
                raise PluginError(f"point {point.id} has no replica of disk {disk.name}")
            path = self.host(f"{fdir}\\{_safe(disk.name)}.vhdx")
            made[disk.name] = path
            disks.append({
                "Parent": files_[disk.name], "Path": path, "Type": kind,
                "Number": number, "Location": location,
            })  # fmt: skip
        nics = [
            {
                "Name": n.name or f"nic{i}",
                "Switch": self.opts.test_switch
                if test
                else network or self.opts.networks.get(n.network) or n.network,
                "Mac": n.mac.replace(":", "").replace("-", "").upper(),
            }
            for i, n in enumerate(vm.nics)
        ]
        name = self.test_name(protection) if test else vm.name
        params = {
            "FailoverId": fid,
            "Name": name,
            "Generation": generation,
            "Memory": vm.memory_mib << 20,
            "Cpus": vm.cpus,
            "Dir": self.host(fdir),
            "Disks": disks,
            "Nics": nics,
            "Notes": "standby:replica test failover" if test else "standby: failed over",
            "TestSwitch": self.opts.test_switch if test else None,
            "Original": original["id"] if original else None,
        }
        answer = self.ps.run(scripts.script("failover", params, scripts.FAILOVER))
        name = str(answer.get("Name", name))
        where_to = (
            f"private switch {self.opts.test_switch}, source untouched"
            if test
            else "the original VM, its disks swapped"
            if original
            else "mapped switches"
        )
        return FailoverResult(
            ref={
                "vm": name,
                "vm_id": str(answer.get("Id", "")),
                "dir": fdir,
                "files": made,
                "failover_id": fid,
                "kind": "test" if test else "real",
            },
            vm_name=name,
            summary=f"{name} running at '{self.site.name}' from point {point.id} ({where_to})",
        )

    def cleanup_test(self, protection: ProtectionInfo, ref: Mapping[str, Any]) -> None:
        """Remove the VM a failover made (by its mark) and its folder of disks."""
        if ref.get("native") == replica.KIND:
            if ref.get("kind", "test") == "test":
                replica.HyperVReplica(self).stop_test(protection)
            return
        test = ref.get("kind", "test") == "test"
        fid = int(ref.get("failover_id") or 0)
        params = {"FailoverId": fid, "TestName": self.test_name(protection) if test else None}
        self.ps.run(scripts.script("remove-vm", params, scripts.REMOVE_VM))
        self.share.rmtree(str(ref.get("dir") or self._fdir(protection, test, fid)))

    def commit_failover(
        self,
        protection: ProtectionInfo,
        ref: Mapping[str, Any],
        point: PointInfo,
        released: list[PointInfo],
    ) -> None:
        """The failed-over VM runs on the point's chain: files of released points newer than
        it (not in that chain) go; the chain stays. (Hyper-V Replica: Complete-VMFailover.)"""
        if point.ref.get("native") == replica.KIND:
            replica.HyperVReplica(self).complete(protection)
            return
        for p in released:
            if p.id > point.id:
                for f in p.ref.get("files", {}).values():
                    self.share.remove(self.rel(str(f)))

    def native(self, kind: str) -> NativeReplication | None:
        """Hyper-V Replica between two Hyper-V hosts (`replication = "hyperv-replica"`)."""
        return replica.HyperVReplica(self) if kind == replica.KIND else None

    def seed(self, protection: ProtectionInfo, original: VMSpec) -> dict[str, Any] | None:
        """The original VM's disks (it must be off) as the base of the new replica: the
        first cycle writes a differencing file over each, holding only what changed."""
        answer = self.ps.run(
            scripts.script("vm-disks", {"VMId": original.id, "Name": original.name},
                           scripts.VM_DISKS)
        )  # fmt: skip
        if not answer:
            return None
        if str(answer.get("State")) != "Off":
            raise ConfigError(
                f"the original VM '{answer.get('Name')}' is {answer.get('State')} at "
                f"'{self.site.name}'; shut it down before re-protecting towards it"
            )
        disks = [(str(d["Name"]), str(d["Path"])) for d in as_list(answer.get("Disks"))]
        by_name = dict(disks)
        if all(d.name in by_name for d in protection.vm.disks):
            chosen = [(d.name, d.name, by_name[d.name]) for d in protection.vm.disks]
        elif len(disks) == len(protection.vm.disks):
            chosen = [(d.name, s, p) for d, (s, p) in zip(protection.vm.disks, disks, strict=True)]
        else:
            return None
        self.prepare(protection)
        record = {
            "id": str(answer["Id"]),
            "name": str(answer["Name"]),
            "slots": {
                d: [m.group(1).upper(), int(m.group(2)), int(m.group(3))]
                for d, s, _p in chosen
                if (m := SLOT.match(s))
            },
        }
        self.share.write_text(f"{self.vm_dir(protection)}\\{ORIGINAL}", json.dumps(record))
        return {
            "files": {d: p for d, _s, p in chosen},
            "formats": {d: "vhdx" for d, _s, _p in chosen},
            "seed": True,
        }

    def _original(self, pinfo: ProtectionInfo) -> dict[str, Any] | None:
        """The original VM a re-protect towards this site was seeded from: a failback goes
        back onto it, whatever name the VM ran under elsewhere."""
        try:
            known = json.loads(self.share.read_text(f"{self.vm_dir(pinfo)}\\{ORIGINAL}"))
        except (NotFound, ValueError):
            return None
        return known if isinstance(known, dict) else None

    def remove(self, protection: ProtectionInfo, points: list[PointInfo]) -> None:
        """Remove the replicas, unless a failed-over VM still runs on their chain (then only
        the test failover's leftovers go, and the chain stays for that VM)."""
        self.cleanup_test(protection, {"kind": "test"})
        folder = self.vm_dir(protection)
        if any(n.startswith("failover-") for n in self.share.listdir(folder)):
            return
        self.share.rmtree(folder)
