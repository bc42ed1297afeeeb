"""`AwsTarget`: replicas as EBS snapshot chains, points as tagged snapshot sets, failover to
EC2 instances."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cached_property
from typing import Any, ClassVar

from standby.core.errors import ConfigError, PluginError
from standby.core.interfaces import ReplicaWriter, Target, TargetCapabilities
from standby.core.model import (
    CostEstimate,
    FailoverResult,
    PointInfo,
    ProtectionInfo,
    Usage,
    Validation,
    VMSpec,
)
from standby.providers.aws import chain, compute, cost, ebs
from standby.providers.aws.conn import AwsPlugin, tags_of


class AwsTarget(AwsPlugin, Target):
    """An AWS account and region as the DR site."""

    plugin_name = "aws"
    capabilities: ClassVar[TargetCapabilities] = TargetCapabilities(
        test_failover=True,
        max_disks=compute.MAX_DISKS,
        max_disk_size=ebs.MAX_DIRECT,
        alignment=512,
        max_write=8 << 20,
        max_parallel_writes=8,
        write_proof="checked by the service (SHA-256 per block, LINEAR checksum per snapshot)",
    )

    def check(self) -> list[str]:
        self.connect()
        self.check_credentials()
        types = compute.list_types(self.clients)
        return [
            f"AWS {self.opts.region} at {self.opts.endpoint_url or 'the public endpoints'}",
            f"{len(types)} x86_64 instance types offered",
        ]

    @cached_property
    def _pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.opts.max_parallel_writes, thread_name_prefix="aws-put")

    def close(self) -> None:
        pool = self.__dict__.pop("_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self.__dict__.pop("_types", None)
        super().close()

    @cached_property
    def prices(self) -> cost.Prices:
        return cost.load_prices(self.opts.prices)

    def _price(self, itype: str) -> float | None:
        try:
            return self.prices.hourly(itype)
        except Exception:  # a broken price table must not block protection
            return None

    @cached_property
    def _types(self) -> list[compute.InstanceType]:
        return compute.list_types(self.clients)

    def validate(self, vm: VMSpec) -> Validation:
        wanted = self.opts.instance_type
        problems, size, notes = compute.validate(vm, self._types, wanted, self._price)
        return Validation(problems=problems, size=size, notes=notes)

    def prepare(self, protection: ProtectionInfo) -> None:
        """Nothing to make ahead: the first cycle starts each disk's chain."""
        self.check_credentials()

    @contextmanager
    def open_writer(
        self, protection: ProtectionInfo, cycle_id: int, base: PointInfo | None
    ) -> Iterator[ReplicaWriter]:
        heads: Mapping[str, str] = (base.ref.get("snapshots") or {}) if base else {}
        yield chain.ChainWriter(self.clients, protection, cycle_id, heads, self._pool).open()

    def discard_pending(self, protection: ProtectionInfo, cycle_id: int) -> None:
        chain.discard(self.clients, protection, cycle_id)

    def prune(
        self, protection: ProtectionInfo, drop: list[PointInfo], keep: list[PointInfo]
    ) -> dict[int, dict[str, Any]]:
        chain.prune(self.clients, protection, drop, keep)
        return {}

    def remove(self, protection: ProtectionInfo, points: list[PointInfo]) -> None:
        """Delete every snapshot of the protection (points and unsealed cycles); a failed-over
        instance runs on volumes, which do not need them."""
        snaps = chain.Snapshots(self.clients, protection)
        snaps.delete(sorted({str(s["SnapshotId"]) for s in snaps.all()}))

    def read_point(
        self, protection: ProtectionInfo, point: PointInfo, disk: str, offset: int, length: int
    ) -> bytes:
        """Bytes of a point's disk, read through the EBS direct APIs (tests, verification)."""
        snap = point.ref.get("snapshots", {}).get(disk)
        if not snap:
            raise PluginError(f"point {point.id} has no snapshot of disk '{disk}'")
        tokens = ebs.list_blocks(self.clients.ebs, snap)
        first, last = offset // ebs.BLOCK, (offset + length - 1) // ebs.BLOCK
        parts = [
            ebs.get_block(self.clients.ebs, snap, i, tokens[i]) if i in tokens else bytes(ebs.BLOCK)
            for i in range(first, last + 1)
        ]
        lo = offset - first * ebs.BLOCK
        return b"".join(parts)[lo : lo + length]

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
        chosen = size or self.opts.instance_type or self.validate(protection.vm).size
        if not chosen:
            raise PluginError(f"no EC2 instance type fits VM '{protection.vm.name}'")
        if not test:
            original = compute.original_instance(self.clients, protection)
            if original is not None:  # a failback: onto the instance the replica was seeded from
                back = compute.Failback(self.clients, protection, key, self.step)
                return back.onto(point, original)
        fo = compute.Failover(self.clients, protection, key, self.step)
        try:
            return fo.run(point, test, network, chosen)
        except BaseException:
            if test:
                fo.cleanup()
            raise

    def cleanup_test(self, protection: ProtectionInfo, ref: Mapping[str, Any]) -> None:
        key = ref.get("failover_id")
        if key is None:
            raise PluginError("failover reference has no failover id; nothing to find by tag")
        compute.Failover(self.clients, protection, str(key), self.step).cleanup()

    def seed(self, protection: ProtectionInfo, original: VMSpec) -> dict[str, Any] | None:
        """Re-protect towards AWS.

        After a failover away from AWS (the VM was an EC2 instance): snapshots of the original
        instance's volumes (it must be stopped) seed the new replica, and a failback goes back
        onto that instance. After a failback from AWS (the VM came from elsewhere): the
        failed-over instance must be stopped; it is removed, and the replica is copied in full
        (its old chain was pruned; EBS cannot seed a chain from a volume without reading it)."""
        for inst in compute.failover_instances(self.clients, protection):
            state = (inst.get("State") or {}).get("Name")
            if state not in ("stopped",):
                raise ConfigError(
                    f"the failed-over instance {inst['InstanceId']} is {state}; fail back (or "
                    "stop it) before re-protecting to AWS"
                )
        for inst in compute.failover_instances(self.clients, protection):
            key = str(tags_of(inst).get(compute.TAG_FAILOVER))
            self.step(f"removing the failed-over instance {inst['InstanceId']}")
            compute.Failover(self.clients, protection, key, self.step).cleanup()
        return compute.seed_from_original(self.clients, protection, original, self.step)

    def estimate_cost(self, usage: list[Usage]) -> CostEstimate:
        return cost.estimate(usage, self.prices)
