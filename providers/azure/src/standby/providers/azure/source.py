"""`AzureSource`: VMs running in Azure (after a failover), read through managed-disk snapshots.

This is what re-protect and failback use when a VM was failed over to Azure: the failed-over
VM's managed disks replicate back to the home site. Each cycle snapshots every managed disk,
grants a read SAS on each snapshot, reads the allocated pages over HTTPS, then revokes access
and deletes the snapshots. There is no change tracking the engine can trust (the page-range
diff between snapshots is not available through the double and is not relied on), so every
cycle reads the allocated ranges and the engine ships only blocks whose checksum changed.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, ClassVar

from standby.core.errors import NotFound, StandbyError
from standby.core.interfaces import Snapshot, Source, SourceCapabilities
from standby.core.model import Consistency, DiskSpec, Extent, Firmware, NicSpec, VMSpec
from standby.providers.azure import compute
from standby.providers.azure.conn import AzurePlugin, azure_errors, call
from standby.providers.azure.storage import read_range

GiB = 1 << 30
TAG_SNAPSHOT_OF = "standby-source-vm"
"""On a snapshot a cycle made: the VM it belongs to (a killed run's are found by it)."""
SAS_SECONDS = 24 * 3600


@dataclass
class _Export:
    """An open snapshot: per disk, the Azure snapshot's name and a blob client on its SAS."""

    snapshots: dict[str, str] = field(default_factory=dict)
    blobs: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


class AzureSource(AzurePlugin, Source):
    """The VMs of an Azure site's resource group."""

    plugin_name = "azure"
    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities(
        change_tracking=False, app_consistent=False, power_ops=True, max_parallel_reads=8
    )

    def __init__(self, site: Any) -> None:
        super().__init__(site)
        self._lock = threading.Lock()

    def check(self) -> list[str]:
        self.connect()
        return [f"{len(self._vms())} VM(s) in resource group '{self.opts.resource_group}'"]

    # ------------------------------------------------------------ inventory

    def _vms(self) -> list[Any]:
        rg = self.opts.resource_group
        return call(
            f"list VMs in {rg}", lambda: list(self.clients.compute.virtual_machines.list(rg))
        )

    def list_vms(self) -> list[VMSpec]:
        return sorted((self._spec(vm) for vm in self._vms()), key=lambda v: v.name)

    def get_vm(self, key: str) -> VMSpec:
        return self._spec(self._find(key))

    def _find(self, key: str) -> Any:
        rg = self.opts.resource_group
        with suppress(NotFound):
            return call(f"read VM {key}", self.clients.compute.virtual_machines.get, rg, key)
        for vm in self._vms():
            if key in (vm.vm_id, vm.name):
                return vm
        raise NotFound(f"VM '{key}' not found at site '{self.site.name}'")

    def _power(self, name: str) -> str:
        return compute.power_state(self.clients, name)

    def _disk_refs(self, vm: Any) -> list[tuple[Any, bool, int | None]]:
        """(managed disk resource, is the OS disk, LUN) for every disk of the VM."""
        rg = self.opts.resource_group
        prof = vm.storage_profile
        refs: list[tuple[str, bool, int | None]] = [(prof.os_disk.managed_disk.id, True, None)]
        refs += [(d.managed_disk.id, False, d.lun) for d in prof.data_disks or []]
        out: list[tuple[Any, bool, int | None]] = []
        for rid, boot, lun in refs:
            name = str(rid).rsplit("/", 1)[-1]
            out.append(
                (call(f"read disk {name}", self.clients.compute.disks.get, rg, name), boot, lun)
            )
        return out

    @staticmethod
    def disk_name(disk: Any, boot: bool, lun: int | None) -> str:
        """The source disk a failed-over disk holds (its tag), else 'os' / 'lun<N>'."""
        tagged = (disk.tags or {}).get(compute.TAG_DISK)
        return str(tagged) if tagged else ("os" if boot else f"lun{lun}")

    @cached_property
    def _sizes(self) -> dict[str, compute.VMSize]:
        """The region's VM sizes by lower-case name (listed once per plugin instance)."""
        return {s.name.lower(): s for s in compute.list_sizes(self.clients)}

    def _spec(self, vm: Any) -> VMSpec:
        size = self._sizes.get(str(vm.hardware_profile.vm_size).lower())
        disks, firmware = [], Firmware.BIOS
        for disk, boot, lun in self._disk_refs(vm):
            nbytes = int(disk.disk_size_bytes or int(disk.disk_size_gb or 0) * GiB)
            disks.append(
                DiskSpec(
                    name=self.disk_name(disk, boot, lun),
                    size=nbytes,
                    format="raw",
                    change_tracking=False,
                    boot=boot,
                )
            )
            if boot and str(disk.hyper_v_generation or "").upper() == "V2":
                firmware = Firmware.UEFI
        nics = []
        rg = self.opts.resource_group
        for ref in vm.network_profile.network_interfaces or []:
            name = str(ref.id).rsplit("/", 1)[-1]
            nic = call(f"read NIC {name}", self.clients.network.network_interfaces.get, rg, name)
            subnet = ""
            for cfg in nic.ip_configurations or []:
                if cfg.subnet is not None and cfg.subnet.id:
                    subnet = str(cfg.subnet.id).rsplit("/", 1)[-1]
            mac = str(nic.mac_address or "").replace("-", ":").lower()
            nics.append(NicSpec(name=name, mac=mac, network=subnet))
        os_type = str(vm.storage_profile.os_disk.os_type or "unknown").lower()
        return VMSpec(
            id=str(vm.vm_id or vm.name),
            name=str(vm.name),
            cpus=size.cores if size else 1,
            memory_mib=size.memory_mib if size else 1024,
            firmware=firmware,
            disks=tuple(disks),
            nics=tuple(nics),
            guest_os=os_type,
            power_state=self._power(str(vm.name)),
            extra={"azure_id": str(vm.id), "azure_size": str(vm.hardware_profile.vm_size)},
        )

    # ------------------------------------------------------------ power

    def power_off(self, vm: VMSpec, force: bool = False) -> None:
        """Stop the guest (graceful unless forced), then deallocate: a stopped VM in Azure
        still bills compute until it is deallocated."""
        rg, c = self.opts.resource_group, self.clients.compute
        name = self._find(vm.id).name
        poller = call(f"power off VM {name}", c.virtual_machines.begin_power_off, rg, name,
                      skip_shutdown=force)  # fmt: skip
        call(f"power off VM {name}", poller.result, timeout=self.opts.operation_timeout)
        call(f"deallocate VM {name}", c.virtual_machines.begin_deallocate, rg, name)

    def power_on(self, vm: VMSpec) -> None:
        rg, c = self.opts.resource_group, self.clients.compute
        name = self._find(vm.id).name
        call(f"start VM {name}", c.virtual_machines.begin_start, rg, name)

    # ------------------------------------------------------------ snapshots

    def _drop_snapshot(self, name: str) -> None:
        """Revoke the SAS of one of our snapshots and delete it (idempotent)."""
        rg, snaps = self.opts.resource_group, self.clients.compute.snapshots
        timeout = self.opts.operation_timeout
        with suppress(NotFound):
            poller = call(f"revoke access to snapshot {name}", snaps.begin_revoke_access, rg, name)
            call(f"revoke access to snapshot {name}", poller.result, timeout=timeout)
            poller = call(f"delete snapshot {name}", snaps.begin_delete, rg, name)
            call(f"delete snapshot {name}", poller.result, timeout=timeout)

    def _leftovers(self, vm_name: str) -> list[str]:
        """Snapshots an earlier cycle of this VM made and did not remove (a killed run)."""
        rg = self.opts.resource_group
        found = call(
            "list snapshots",
            lambda: list(self.clients.compute.snapshots.list_by_resource_group(rg)),
        )
        return [str(s.name) for s in found if (s.tags or {}).get(TAG_SNAPSHOT_OF) == vm_name]

    def _export(self, vm_name: str, disk: Any, std_name: str, tag: str, out: _Export) -> None:
        from azure.storage.blob import BlobClient

        rg, snaps = self.opts.resource_group, self.clients.compute.snapshots
        name = f"{str(disk.name)[:60]}-sb{tag}"
        body = {
            "location": self.opts.location,
            "tags": {TAG_SNAPSHOT_OF: vm_name},
            "properties": {
                "creationData": {"createOption": "Copy", "sourceResourceId": disk.id},
                "incremental": True,
            },
        }
        with self._lock:
            out.snapshots[std_name] = name
        poller = call(f"snapshot disk {disk.name}", snaps.begin_create_or_update, rg, name, body)
        call(f"snapshot disk {disk.name}", poller.result, timeout=self.opts.operation_timeout)
        grant = {"access": "Read", "durationInSeconds": SAS_SECONDS}
        poller = call(f"read access to snapshot {name}", snaps.begin_grant_access, rg, name, grant)
        access = call(f"read access to snapshot {name}", poller.result,
                      timeout=self.opts.operation_timeout)  # fmt: skip
        blob = BlobClient.from_blob_url(
            access.access_sas, connection_verify=self.clients.verify, retry_total=3
        )
        with self._lock:
            out.blobs[std_name] = blob
            out.sizes[std_name] = int(disk.disk_size_bytes or int(disk.disk_size_gb or 0) * GiB)

    @contextmanager
    def open_snapshot(
        self, vm: VMSpec, consistency: Consistency, since: Mapping[str, str | None]
    ) -> Iterator[Snapshot]:
        found = self._find(vm.id)
        vm_name = str(found.name)
        for name in self._leftovers(vm_name):
            self._drop_snapshot(name)
        refs = self._disk_refs(found)
        notes = []
        if consistency is Consistency.APP:
            notes.append("Azure source: crash-consistent snapshots only")
        running = self._power(vm_name) != "shutoff"
        if running and len(refs) > 1:
            notes.append(
                f"{len(refs)} disk snapshots of a running VM are taken one after the other "
                "(each crash-consistent, not all at one instant)"
            )
        tag = uuid.uuid4().hex[:8]
        out = _Export()
        try:
            with ThreadPoolExecutor(max_workers=min(8, len(refs))) as pool:
                jobs = [
                    pool.submit(
                        self._export, vm_name, disk, self.disk_name(disk, boot, lun), tag, out
                    )
                    for disk, boot, lun in refs
                ]
                for job in jobs:
                    job.result()
            taken_at = datetime.now(UTC)
            names = list(out.blobs)
            yield Snapshot(
                vm=vm,
                consistency=Consistency.CRASH,
                taken_at=taken_at,
                since={d: None for d in names},
                tokens={d: None for d in names},
                handle=out,
                notes=notes,
            )
        finally:
            for blob in out.blobs.values():
                with suppress(Exception):
                    blob.close()
            errors = []
            for name in out.snapshots.values():
                try:
                    self._drop_snapshot(name)
                except StandbyError as exc:
                    errors.append(str(exc))  # the next cycle removes it (found by tag)
            if errors:
                notes.append("snapshots left for the next cycle to remove: " + "; ".join(errors))

    def changed_extents(self, snapshot: Snapshot, disk: str) -> Iterator[Extent]:
        """All allocated pages of the disk (the VHD footer past the disk's end excluded)."""
        export: _Export = snapshot.handle
        blob, size = export.blobs[disk], export.sizes[disk]
        with azure_errors(f"page ranges of disk '{disk}'"):
            ranges = sorted(
                (int(r.start), int(r.end) + 1) for r in blob.list_page_ranges() if not r.cleared
            )
        for start, end in ranges:
            end = min(end, size)
            if start < end:
                yield Extent(start, end - start)

    def read(self, snapshot: Snapshot, disk: str, extent: Extent) -> bytes:
        export: _Export = snapshot.handle
        return read_range(export.blobs[disk], extent, f"read disk '{disk}' of {snapshot.vm.name}")
