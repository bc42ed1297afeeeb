"""`AwsSource`: EC2 instances, read through EBS snapshots and the EBS direct APIs.

Each cycle takes one crash-consistent set of snapshots of all the instance's volumes with
`create_snapshots` (one instant for every volume), waits until they are completed, and lists
what changed since the previous cycle's snapshot of the same volume (`list_changed_blocks`,
paged; the first cycle `list_snapshot_blocks`). Bytes come from `get_snapshot_block`, 512 KiB
at a time, SHA-256 checked, many in flight. The change token of a disk is its snapshot id;
once the point is committed the older snapshots are deleted (`release_tokens`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, ClassVar

from standby.core.errors import NotFound, StandbyError
from standby.core.interfaces import Buffer, Snapshot, Source, SourceCapabilities
from standby.core.model import Consistency, DiskSpec, Extent, Firmware, NicSpec, VMSpec
from standby.providers.aws import ebs
from standby.providers.aws.conn import AwsPlugin, call, paged, tags_of

TAG_SOURCE = "standby-source-vm"
"""On a snapshot a cycle made: the instance it belongs to (found by it after a kill)."""
TAG_DISKS = "standby-disks"
"""On an instance standby launched: `device=disk:bytes,...`, the source disks it holds."""
TAG_KIND = "standby-kind"
POWER = {
    "pending": "running",
    "running": "running",
    "stopping": "shutdown",
    "stopped": "shutoff",
    "shutting-down": "shutoff",
}


def parse_disks_tag(value: str) -> dict[str, tuple[str, int]]:
    """`xvda=vda:52428800,sdf=vdb:16777216` -> {'xvda': ('vda', 52428800), ...}."""
    out: dict[str, tuple[str, int]] = {}
    for item in filter(None, value.split(",")):
        dev, _, rest = item.partition("=")
        name, _, size = rest.partition(":")
        if dev and name:
            out[dev] = (name, int(size) if size.isdigit() else 0)
    return out


def short_device(device: str) -> str:
    return device.removeprefix("/dev/")


@dataclass
class _Cycle:
    """An open snapshot set: per disk, the new snapshot, its volume, and block tokens."""

    snaps: dict[str, str] = field(default_factory=dict)
    volumes: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, dict[int, str | None]] = field(default_factory=dict)
    full: dict[str, bool] = field(default_factory=dict)
    retried: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class AwsSource(AwsPlugin, Source):
    """The EC2 instances of an AWS region."""

    plugin_name = "aws"
    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities(
        change_tracking=True, app_consistent=False, power_ops=True, max_parallel_reads=8
    )

    def __init__(self, site: Any) -> None:
        super().__init__(site)
        self._lock = threading.Lock()

    def check(self) -> list[str]:
        self.connect()
        self.check_credentials()
        return [f"{len(self._instances())} instance(s) in {self.opts.region}"]

    @cached_property
    def _pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.opts.max_parallel_reads, thread_name_prefix="aws-read")

    def close(self) -> None:
        pool = self.__dict__.pop("_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        super().close()

    # ------------------------------------------------------------ inventory

    def _instances(self, ids: list[str] | None = None) -> list[dict[str, Any]]:
        args: dict[str, Any] = {
            "Filters": [
                {
                    "Name": "instance-state-name",
                    "Values": ["pending", "running", "stopping", "stopped"],
                }
            ]
        }
        if ids:
            args["InstanceIds"] = ids
        found = []
        for res in paged(
            "describe instances", self.clients.ec2.describe_instances, "Reservations", **args
        ):
            for inst in res.get("Instances", []):
                if tags_of(inst).get(TAG_KIND) != "test":
                    found.append(inst)
        return found

    def _types(self, names: set[str]) -> dict[str, dict[str, Any]]:
        if not names:
            return {}
        got = paged(
            "describe instance types",
            self.clients.ec2.describe_instance_types,
            "InstanceTypes",
            InstanceTypes=sorted(names),
        )
        return {str(t["InstanceType"]): t for t in got}

    def _volumes(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        got = paged("describe volumes", self.clients.ec2.describe_volumes, "Volumes", VolumeIds=ids)
        return {str(v["VolumeId"]): v for v in got}

    def list_vms(self) -> list[VMSpec]:
        found = self._instances()
        types = self._types({str(i["InstanceType"]) for i in found})
        return sorted((self._spec(i, types) for i in found), key=lambda v: v.name)

    def get_vm(self, key: str) -> VMSpec:
        inst = self._find(key)
        return self._spec(inst, self._types({str(inst["InstanceType"])}))

    def _find(self, key: str) -> dict[str, Any]:
        if key.startswith("i-"):
            with suppress(NotFound):
                got = self._instances([key])
                if got:
                    return got[0]
        for inst in self._instances():
            if key in (inst["InstanceId"], tags_of(inst).get("Name")):
                return inst
        raise NotFound(f"VM '{key}' not found at site '{self.site.name}'")

    def disk_map(self, inst: dict[str, Any]) -> list[tuple[str, str, int, bool]]:
        """(disk name, volume id, size in bytes, boot) per EBS volume of the instance, in
        device order; names and sizes from the standby-disks tag of a failed-over instance."""
        mapped = parse_disks_tag(tags_of(inst).get(TAG_DISKS, ""))
        bdms = [b for b in inst.get("BlockDeviceMappings", []) if "Ebs" in b]
        vols = self._volumes([str(b["Ebs"]["VolumeId"]) for b in bdms])
        root = str(inst.get("RootDeviceName") or "")
        devices = [str(b["DeviceName"]) for b in bdms]
        usual = [d for d in ("/dev/xvda", "/dev/sda1", "/dev/sda", "/dev/nvme0n1") if d in devices]
        boot_dev = root if root in devices else (usual or devices or [""])[0]
        out = []
        for b in sorted(bdms, key=lambda b: (b["DeviceName"] != boot_dev, b["DeviceName"])):
            dev = str(b["DeviceName"])
            vol_id = str(b["Ebs"]["VolumeId"])
            size = int(vols.get(vol_id, {}).get("Size", 1)) * ebs.GiB
            name, exact = mapped.get(short_device(dev), (short_device(dev), 0))
            if 0 < exact <= size:
                size = exact
            out.append((name, vol_id, size, dev == boot_dev))
        return out

    def _spec(self, inst: dict[str, Any], types: Mapping[str, dict[str, Any]]) -> VMSpec:
        itype = str(inst["InstanceType"])
        info = types.get(itype, {})
        cpus = int((info.get("VCpuInfo") or {}).get("DefaultVCpus") or 1)
        memory = int((info.get("MemoryInfo") or {}).get("SizeInMiB") or 1024)
        boot_mode = str(inst.get("CurrentInstanceBootMode") or inst.get("BootMode") or "")
        firmware = Firmware.UEFI if boot_mode.startswith("uefi") else Firmware.BIOS
        disks = tuple(
            DiskSpec(name=n, size=s, format="raw", change_tracking=True, boot=b)
            for n, _v, s, b in self.disk_map(inst)
        )
        nics = tuple(
            NicSpec(
                name=str(n.get("NetworkInterfaceId", f"eni{i}")),
                mac=str(n.get("MacAddress", "")).lower(),
                network=str(n.get("SubnetId", "")),
            )
            for i, n in enumerate(
                sorted(
                    inst.get("NetworkInterfaces", []),
                    key=lambda n: (n.get("Attachment") or {}).get("DeviceIndex", 0),
                )
            )
        )
        tags = tags_of(inst)
        platform = str(inst.get("PlatformDetails") or inst.get("Platform") or "linux").lower()
        return VMSpec(
            id=str(inst["InstanceId"]),
            name=tags.get("Name") or str(inst["InstanceId"]),
            cpus=cpus,
            memory_mib=memory,
            firmware=firmware,
            disks=disks,
            nics=nics,
            guest_os="windows" if "windows" in platform else "linux",
            power_state=POWER.get(str((inst.get("State") or {}).get("Name")), "unknown"),
            extra={"aws_instance_type": itype, "aws_id": str(inst["InstanceId"])},
        )

    # ------------------------------------------------------------ power

    def power_off(self, vm: VMSpec, force: bool = False) -> None:
        call(
            f"stop instance {vm.id}",
            self.clients.ec2.stop_instances,
            InstanceIds=[vm.id],
            Force=force,
        )

    def power_on(self, vm: VMSpec) -> None:
        call(f"start instance {vm.id}", self.clients.ec2.start_instances, InstanceIds=[vm.id])

    # ------------------------------------------------------------ snapshots and tokens

    def _ours(self, vm_id: str) -> dict[str, dict[str, Any]]:
        """The snapshots cycles of this instance made, by id."""
        got = paged(
            "describe snapshots",
            self.clients.ec2.describe_snapshots,
            "Snapshots",
            OwnerIds=["self"],
            Filters=[{"Name": f"tag:{TAG_SOURCE}", "Values": [vm_id]}],
        )
        return {str(s["SnapshotId"]): s for s in got}

    def token_valid(self, vm: VMSpec, token: str) -> bool:
        snap = self._ours(vm.id).get(token)
        return snap is not None and snap.get("State") == "completed"

    def release_tokens(self, vm: VMSpec, keep: Mapping[str, str | None]) -> None:
        """Delete this instance's cycle snapshots other than `keep` (older points', a killed
        cycle's)."""
        wanted = {t for t in keep.values() if t}
        for snap_id in sorted(set(self._ours(vm.id)) - wanted):
            with suppress(NotFound):
                call(
                    f"delete snapshot {snap_id}",
                    self.clients.ec2.delete_snapshot,
                    SnapshotId=snap_id,
                )

    def _take(self, vm: VMSpec, inst: dict[str, Any]) -> _Cycle:
        """One create_snapshots call for every volume, then wait until all are completed."""
        ec2 = self.clients.ec2
        got = call(
            f"snapshot the volumes of {vm.name}",
            ec2.create_snapshots,
            InstanceSpecification={"InstanceId": vm.id, "ExcludeBootVolume": False},
            Description=f"standby cycle of {vm.name} ({vm.id})",
            TagSpecifications=[
                {"ResourceType": "snapshot", "Tags": [{"Key": TAG_SOURCE, "Value": vm.id}]}
            ],
            CopyTagsFromSource="volume",
        )
        by_volume = {str(s["VolumeId"]): str(s["SnapshotId"]) for s in got.get("Snapshots", [])}
        if by_volume:  # also tagged here: moto does not apply TagSpecifications to them
            call(
                "tag snapshots",
                ec2.create_tags,
                Resources=sorted(by_volume.values()),
                Tags=[{"Key": TAG_SOURCE, "Value": vm.id}],
            )
        cycle = _Cycle()
        for name, vol_id, size, _boot in self.disk_map(inst):
            if vol_id not in by_volume:
                raise NotFound(f"create_snapshots made no snapshot of volume {vol_id} ({name})")
            cycle.snaps[name] = by_volume[vol_id]
            cycle.volumes[name] = vol_id
            cycle.sizes[name] = size
        ebs.wait_completed(
            ec2, cycle.snaps.values(), self.opts.operation_timeout, self.opts.poll_seconds
        )
        return cycle

    @contextmanager
    def open_snapshot(
        self, vm: VMSpec, consistency: Consistency, since: Mapping[str, str | None]
    ) -> Iterator[Snapshot]:
        inst = self._find(vm.id)
        notes = []
        if consistency is Consistency.APP:
            notes.append("AWS source: crash-consistent snapshots only (all volumes at one instant)")
        cycle = self._take(vm, inst)
        ok = False
        try:
            ours = self._ours(vm.id)
            snaps_of: dict[str, str] = {
                sid: str(s.get("VolumeId"))
                for sid, s in ours.items()
                if s.get("State") == "completed"
            }
            valid: dict[str, str | None] = {}
            for disk, vol in cycle.volumes.items():
                tok = since.get(disk)
                if tok and snaps_of.get(tok) == vol:
                    valid[disk] = tok
                else:
                    valid[disk] = None
                    if tok:
                        notes.append(
                            f"disk '{disk}': previous snapshot {tok} is gone or of another "
                            "volume; full read with hash-compare"
                        )
            yield Snapshot(
                vm=vm,
                consistency=Consistency.CRASH,
                taken_at=datetime.now(UTC),
                since=valid,
                tokens=dict[str, str | None](cycle.snaps),
                handle=cycle,
                notes=notes,
            )
            ok = True
        finally:
            if not ok:  # the cycle failed: its snapshots serve nothing (a kill: release_tokens)
                for snap_id in cycle.snaps.values():
                    with suppress(StandbyError):
                        call(
                            "delete snapshot", self.clients.ec2.delete_snapshot, SnapshotId=snap_id
                        )

    def changed_extents(self, snapshot: Snapshot, disk: str) -> Iterator[Extent]:
        cycle: _Cycle = snapshot.handle
        new, old = cycle.snaps[disk], snapshot.since.get(disk)
        blocks: dict[int, str | None]
        if old:
            blocks = ebs.changed_blocks(self.clients.ebs, old, new)
        else:
            blocks = dict(ebs.list_blocks(self.clients.ebs, new))
        with cycle.lock:
            cycle.tokens[disk] = blocks
            cycle.full[disk] = not old
        self._note_retries(snapshot)
        size = cycle.sizes[disk]
        run: list[int] = []
        for idx in sorted(blocks):
            start = idx * ebs.BLOCK
            if start >= size:
                break
            if run and run[1] == start:
                run[1] = min(size, start + ebs.BLOCK)
            else:
                if run:
                    yield Extent(run[0], run[1] - run[0])
                run = [start, min(size, start + ebs.BLOCK)]
        if run:
            yield Extent(run[0], run[1] - run[0])

    def _note_retries(self, snapshot: Snapshot) -> None:
        """Keep one note in the cycle's report with the calls retried so far."""
        cycle: _Cycle = snapshot.handle
        with cycle.lock:
            for code, n in self.clients.retries.take().items():
                cycle.retried[code] = cycle.retried.get(code, 0) + n
            if not cycle.retried:
                return
            told = ", ".join(f"{c} x{n}" for c, n in sorted(cycle.retried.items()))
            note = f"AWS source: calls retried with backoff: {told}"
            old = [i for i, n in enumerate(snapshot.notes) if n.startswith("AWS source: calls")]
            if old:
                snapshot.notes[old[0]] = note
            else:
                snapshot.notes.append(note)

    def _token(self, cycle: _Cycle, disk: str, idx: int) -> str | None:
        with cycle.lock:
            tokens = cycle.tokens.get(disk)
            full = cycle.full.get(disk, False)
        if tokens is not None and (full or idx in tokens):
            return tokens.get(idx)
        listed: dict[int, str | None] = dict(ebs.list_blocks(self.clients.ebs, cycle.snaps[disk]))
        with cycle.lock:
            cycle.tokens[disk], cycle.full[disk] = listed, True
        return listed.get(idx)

    def _block(self, cycle: _Cycle, disk: str, idx: int) -> bytes:
        token = self._token(cycle, disk, idx)
        if token is None:
            return bytes(ebs.BLOCK)
        return ebs.get_block(self.clients.ebs, cycle.snaps[disk], idx, token)

    def _assemble(self, cycle: _Cycle, disk: str, extent: Extent, got: dict[int, bytes]) -> bytes:
        first, last = extent.offset // ebs.BLOCK, (extent.end - 1) // ebs.BLOCK
        joined = b"".join(got[i] for i in range(first, last + 1))
        lo = extent.offset - first * ebs.BLOCK
        return joined[lo : lo + extent.length]

    def read(self, snapshot: Snapshot, disk: str, extent: Extent) -> Buffer:
        return self.read_many(snapshot, disk, [extent])[0]

    def read_many(self, snapshot: Snapshot, disk: str, extents: list[Extent]) -> list[Buffer]:
        """Every 512 KiB block the extents touch, fetched concurrently, then cut to size."""
        cycle: _Cycle = snapshot.handle
        wanted = sorted(
            {i for e in extents for i in range(e.offset // ebs.BLOCK, (e.end - 1) // ebs.BLOCK + 1)}
        )
        if len(wanted) == 1:
            got = {wanted[0]: self._block(cycle, disk, wanted[0])}
        else:
            futures = {i: self._pool.submit(self._block, cycle, disk, i) for i in wanted}
            got = {i: f.result() for i, f in futures.items()}
        if self.clients.retries.counts:
            self._note_retries(snapshot)
        return [self._assemble(cycle, disk, e, got) for e in extents]
