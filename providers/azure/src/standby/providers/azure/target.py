"""`AzureTarget`: replicas in page blobs, points as snapshots, failover to Azure VMs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from typing import Any, ClassVar

from standby.core.errors import ConfigError, PluginError
from standby.core.interfaces import ReplicaWriter, Target, TargetCapabilities
from standby.core.model import (
    CostEstimate,
    Extent,
    FailoverResult,
    PointInfo,
    ProtectionInfo,
    Usage,
    Validation,
    VMSpec,
)
from standby.core.vault.seal import MetaSealer, site_sealer
from standby.providers.azure import compute, cost, storage
from standby.providers.azure.conn import AzurePlugin, azure_errors, call


class AzureTarget(AzurePlugin, Target):
    """An Azure subscription + resource group + storage account as the DR site."""

    plugin_name = "azure"
    capabilities: ClassVar[TargetCapabilities] = TargetCapabilities(
        test_failover=True,
        max_disks=1 + compute.MAX_DATA_DISKS,
        max_disk_size=storage.MAX_DISK,
        alignment=storage.PAGE,
        max_write=storage.MAX_PUT_PAGE,
        max_parallel_writes=8,
        write_proof="checked by the service (Content-MD5)",
    )

    def check(self) -> list[str]:
        self.connect()
        props = self._ensure_container()
        sizes = compute.list_sizes(self.clients)
        return [
            f"storage container '{self.opts.container}' at {self.opts.blob_endpoint} "
            f"(last modified {props})",
            f"ARM {self.opts.arm_endpoint}: {len(sizes)} VM sizes in {self.opts.location}",
        ]

    def _ensure_container(self) -> str:
        from azure.core.exceptions import ResourceExistsError

        container = self.clients.container
        with azure_errors(f"storage container '{self.opts.container}'"):
            try:
                container.create_container()
            except ResourceExistsError:
                pass
            return str(container.get_container_properties().last_modified)

    @cached_property
    def prices(self) -> cost.Prices:
        return cost.load_prices(self.opts.prices)

    def _price(self, size: str) -> float | None:
        try:
            return self.prices.hourly(size)
        except Exception:  # a broken price table must not block protection
            return None

    def validate(self, vm: VMSpec) -> Validation:
        problems, size, notes = compute.validate(
            vm, compute.list_sizes(self.clients), self.opts.vm_size, self._price
        )
        return Validation(problems=problems, size=size, notes=notes)

    @property
    def sealer(self) -> MetaSealer | None:
        """The sealer of the vault this site names (its manifests are sealed), or None."""
        return site_sealer(self.site.path.parent.parent, self.opts.vault)

    def prepare(self, protection: ProtectionInfo) -> None:
        self._ensure_container()

    @contextmanager
    def open_writer(
        self, protection: ProtectionInfo, cycle_id: int, base: PointInfo | None
    ) -> Iterator[ReplicaWriter]:
        yield storage.PageBlobWriter(
            self.clients.container, protection, cycle_id, self.sealer
        ).open()

    def _disks(self, protection: ProtectionInfo) -> list[storage.PageBlobDisk]:
        return [
            storage.PageBlobDisk(self.clients.container, storage.disk_blob(protection, d.name), d)
            for d in protection.vm.disks
        ]

    def discard_pending(self, protection: ProtectionInfo, cycle_id: int) -> None:
        """Put every replica blob back to its newest point (zeroes when there is none)."""
        for disk in self._disks(protection):
            snaps = {
                pid: ts
                for pid, ts in disk.snapshots().items()
                if storage.read_manifest(self.clients.container, protection, pid, self.sealer)
                is not None
            }
            if not disk.exists():
                continue
            disk.restore(snaps[max(snaps)] if snaps else None)

    def prune(
        self, protection: ProtectionInfo, drop: list[PointInfo], keep: list[PointInfo]
    ) -> dict[int, dict[str, Any]]:
        """Delete the dropped points' snapshots and manifests; kept points never move."""
        from azure.core.exceptions import ResourceNotFoundError

        container = self.clients.container
        for point in drop:
            blobs: Mapping[str, str] = point.ref.get("blobs", {})
            for disk, ts in point.ref.get("snapshots", {}).items():
                name = blobs.get(disk) or storage.disk_blob(protection, disk)
                with azure_errors(f"delete snapshot of {name}"):
                    try:
                        container.get_blob_client(name, snapshot=ts).delete_blob()
                    except ResourceNotFoundError:
                        pass
            name = storage.manifest_blob(protection, int(point.ref.get("point", point.id)))
            with azure_errors(f"delete point manifest {name}"):
                try:
                    container.delete_blob(name)
                except ResourceNotFoundError:
                    pass
        return {}

    def remove(self, protection: ProtectionInfo, points: list[PointInfo]) -> None:
        """Delete the protection's blobs, their snapshots and the point manifests."""
        from azure.core.exceptions import ResourceNotFoundError

        container = self.clients.container
        folder = storage.prefix(protection) + "/"
        with azure_errors(f"remove replicas under {folder}"):
            names = {b.name for b in container.list_blobs(name_starts_with=folder)}
            for name in sorted(names):
                try:
                    container.delete_blob(name, delete_snapshots="include")
                except ResourceNotFoundError:
                    pass

    def read_point(
        self, protection: ProtectionInfo, point: PointInfo, disk: str, offset: int, length: int
    ) -> bytes:
        """Bytes of a point's disk, read from its snapshot (for verification and tests)."""
        spec = protection.vm.disk(disk)
        blob = point.ref.get("blobs", {}).get(disk) or storage.disk_blob(protection, disk)
        snap = point.ref.get("snapshots", {}).get(disk)
        if not snap:
            raise PluginError(f"point {point.id} has no snapshot of disk '{disk}'")
        return storage.PageBlobDisk(self.clients.container, blob, spec).read(
            Extent(offset, length), snapshot=snap
        )

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
        key = str(failover_id) if failover_id is not None else compute.new_key()
        chosen = size or self.opts.vm_size or self.validate(protection.vm).size
        if not chosen:
            raise PluginError(f"no Azure VM size fits VM '{protection.vm.name}'")
        fo = compute.Failover(self.clients, protection, key, self.step)
        return fo.run(point, test, network, chosen)

    def cleanup_test(self, protection: ProtectionInfo, ref: Mapping[str, Any]) -> None:
        key = ref.get("failover_id")
        if key is None:
            raise PluginError("failover reference has no failover id; nothing to find by tag")
        compute.Failover(self.clients, protection, str(key), self.step).cleanup()

    def seed(self, protection: ProtectionInfo, original: VMSpec) -> dict[str, Any] | None:
        """Re-protect towards Azure after a failback: the replica blobs are still here and
        hold the VM as it was when it failed over to Azure; they seed the new replica, their
        content unknown to the engine (it reads them back and ships only differences).

        The failed-over Azure VM, its NICs and disks are deleted first: failback brought their
        data home and stopped the VM. A VM of this protection still running is refused."""
        rg, c = self.opts.resource_group, self.clients.compute
        mine = [
            vm
            for vm in call("list VMs", lambda: list(c.virtual_machines.list(rg)))
            if (vm.tags or {}).get(compute.TAG_PROTECTION) == str(protection.id)
            and (vm.tags or {}).get(compute.TAG_KIND) == "failover"
        ]
        for vm in mine:
            state = compute.power_state(self.clients, str(vm.name))
            if state != "shutoff":
                raise ConfigError(
                    f"the failed-over Azure VM {vm.name} is {state}; fail back (or stop it) "
                    "before re-protecting to Azure"
                )
        for vm in mine:
            key = str((vm.tags or {}).get(compute.TAG_FAILOVER))
            self.step(f"removing the failed-over Azure VM {vm.name} (failback took its data home)")
            compute.Failover(self.clients, protection, key, self.step).cleanup()
        for disk in self._disks(protection):
            disk.ensure()
        return {
            "blobs": {d.name: storage.disk_blob(protection, d.name) for d in protection.vm.disks},
            "exact": False,
        }

    def estimate_cost(self, usage: list[Usage]) -> CostEstimate:
        return cost.estimate(usage, self.prices, self.opts.disk_sku)
