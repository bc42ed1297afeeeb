"""One replication cycle of one protection, in the order the steps happen:

begin (inventory, base point, resume or new cycle row) -> snapshot -> plan (extents per
disk) -> copy (read, hash, write; checkpoints) -> verify -> commit (seal at the target, then
one transaction makes the point visible) -> release stale change tokens -> retention.
The caller holds the VM's lock.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.core.config import Policy
from standby.core.errors import CapabilityNotSupported, ConfigError, NotFound, StandbyError
from standby.core.extents import Manifest
from standby.core.interfaces import ReplicaWriter, Snapshot, Source, Target
from standby.core.model import Consistency, PointInfo, ProtectionInfo, VMSpec
from standby.core.state import (
    ChangeToken,
    Cycle,
    CycleDisk,
    Protection,
    RecoveryPoint,
    aware,
    latest_point,
    point_info,
    protection_info,
)

from . import checkpoint, commit, native, retention
from .context import Context
from .copier import Copier, Throttle
from .planning import DiskJob, Progress, cycle_kind, plan_disk, planned_bytes
from .progress import Progress as ProgressSink
from .report import CycleReport
from .verify import verify, verify_mode


@dataclass
class Begun:
    """What `begin` found and decided, detached from the database session."""

    cycle_id: int
    resumed: bool
    phase: str
    vm: VMSpec
    pinfo: ProtectionInfo
    policy: Policy
    base: PointInfo | None
    seeded: bool
    manifests: dict[str, Manifest]
    since: dict[str, str | None]
    progress: dict[str, Progress] = field(default_factory=dict)
    want_app: bool = False


class CycleRun:
    """Runs one cycle; `run()` returns the report of the point it made."""

    def __init__(
        self,
        ctx: Context,
        protection_id: int,
        progress: ProgressSink | None = None,
        cancel: threading.Event | None = None,
        on_point: Callable[[CycleReport], None] | None = None,
        final: bool = False,
    ) -> None:
        self.ctx = ctx
        self.final = final
        self.protection_id = protection_id
        self.progress = progress or ctx.progress
        self.cancel = cancel
        self.on_point = on_point
        self.started = time.monotonic()
        self._last = self.started
        self.phases: dict[str, float] = {}

    def _lap(self, phase: str) -> None:
        """Seconds spent in `phase` (since the previous lap), for the report."""
        now = time.monotonic()
        self.phases[phase] = round(self.phases.get(phase, 0.0) + now - self._last, 4)
        self._last = now

    def run(self) -> CycleReport:
        with self.ctx.state.session() as s:
            prot = s.get(Protection, self.protection_id)
            assert prot is not None
            native_mode = native.is_native(prot.policy)
        if native_mode:  # the platform moves the bytes: record what it reports
            return native.cycle(self.ctx, self.protection_id, self.final)
        b = self.begin()
        source, target = self.ctx.source(b.pinfo.source_site), self.ctx.target(b.pinfo.target_site)
        self._lap("begin")
        if b.resumed and b.phase == "commit":  # killed between seal and visibility
            return self.finish(b, source, target, None, [])
        consistency = Consistency.APP if b.want_app else Consistency.CRASH
        with source.open_snapshot(b.vm, consistency, b.since) as snap:
            self._record_snapshot(b.cycle_id, snap)
            self._lap("snapshot")
            with target.open_writer(b.pinfo, b.cycle_id, b.base) as writer:
                self._lap("open_writer")
                jobs = [
                    plan_disk(
                        source,
                        snap,
                        d.name,
                        d.size,
                        b.base,
                        b.manifests,
                        b.progress.get(d.name),
                        b.seeded,
                    )
                    for d in b.vm.disks
                ]
                self._record_plan(b.cycle_id, jobs)
                self._lap("plan")
                self._copy_and_verify(b, source, target, snap, writer, jobs)
                return self.finish(b, source, target, writer, snap.notes)

    # ----------------------------------------------------------------- begin

    def begin(self) -> Begun:
        """Inventory, base point and tokens; resume the running cycle or start a new one."""
        ctx = self.ctx
        with ctx.state.session() as s:
            prot = s.get(Protection, self.protection_id)
            assert prot is not None
            policy = Policy.model_validate(prot.policy)
            source, target = ctx.sites.pair(prot.source_site, prot.target_site)
            vm = self._current_vm(prot, source)
            if prot.state != "protected":
                raise ConfigError(
                    f"VM '{prot.vm_name}' is {prot.state}; replication is stopped until "
                    f"`standby reprotect {prot.vm_name}`"
                )
            self._check_disks(prot, VMSpec.from_dict(prot.spec), vm, target)
            base = latest_point(s, prot.id, with_seed=True)
            base_info = point_info(base) if base else None
            cycle, resumed = self._cycle_row(s, prot, vm, base, target)
            progress = checkpoint.load(
                list(s.scalars(select(CycleDisk).where(CycleDisk.cycle_id == cycle.id)))
            )
            b = Begun(
                cycle_id=cycle.id,
                resumed=resumed,
                phase=cycle.phase,
                vm=vm,
                pinfo=protection_info(prot, vm),
                policy=policy,
                base=base_info,
                seeded=base is not None and base.state == "seed",
                manifests={d.disk: Manifest.from_blob(d.size, d.manifest) for d in base.disks}
                if base
                else {},
                since={},
                progress=progress,
                want_app=_app_due(s, prot.id, policy) and source.capabilities.app_consistent,
            )
            tokens = {
                t.disk: t.token
                for t in s.scalars(select(ChangeToken).where(ChangeToken.protection_id == prot.id))
                if base is not None and t.point_id == base.id
            }
            prior = dict(cycle.snapshot_tokens or {}) if resumed else {}
        b.since = self._since(b, source, tokens, prior)
        return b

    def _current_vm(self, prot: Protection, source: Source) -> VMSpec:
        try:
            return source.get_vm(prot.vm_id)
        except NotFound:
            n = sum(1 for p in prot.points if p.state == "visible")
            self._set_health(
                prot.id, "source-missing", f"source VM no longer exists at '{prot.source_site}'"
            )
            raise NotFound(
                f"source VM '{prot.vm_name}' no longer exists at site '{prot.source_site}'; "
                f"the protection and its {n} recovery point(s) are kept"
            ) from None

    def _set_health(self, protection_id: int, health: str, reason: str) -> None:
        """Stored in its own transaction: the caller's is rolled back by the error."""
        with self.ctx.state.session() as s:
            prot = s.get(Protection, protection_id)
            assert prot is not None
            prot.health, prot.health_reason = health, reason

    @staticmethod
    def _check_disks(prot: Protection, old: VMSpec, vm: VMSpec, target: Target) -> None:
        """Refuse a shrunk disk; re-validate a changed VM; remember the VM as it is now."""
        old_sizes = {d.name: d.size for d in old.disks}
        for disk in vm.disks:
            if disk.name in old_sizes and disk.size < old_sizes[disk.name]:
                raise CapabilityNotSupported(
                    f"disk '{disk.name}' of VM '{vm.name}' shrank from {old_sizes[disk.name]} to "
                    f"{disk.size} bytes; shrinking a protected disk is not supported"
                )
        if vm.disks != old.disks:
            verdict = target.validate(vm)
            if not verdict.ok:
                raise CapabilityNotSupported(
                    f"VM '{vm.name}' changed and can no longer be protected: "
                    + "; ".join(verdict.problems)
                )
        prot.spec = vm.to_dict()

    @staticmethod
    def _cycle_row(
        s: Session, prot: Protection, vm: VMSpec, base: RecoveryPoint | None, target: Target
    ) -> tuple[Cycle, bool]:
        """The running cycle of the same base (resumed), or a new one; a running cycle of
        another base is discarded at the target and abandoned."""
        cycle = s.scalars(
            select(Cycle).where(Cycle.protection_id == prot.id, Cycle.status == "running")
        ).first()
        if cycle is not None and cycle.base_point_id != (base.id if base else None):
            target.discard_pending(protection_info(prot, vm), cycle.id)
            cycle.status = "abandoned"
            cycle = None
        if cycle is None:
            cycle = Cycle(
                protection_id=prot.id, base_point_id=base.id if base else None, pid=os.getpid()
            )
            s.add(cycle)
            s.flush()
            return cycle, False
        cycle.resumed += 1
        cycle.pid = os.getpid()
        cycle.error = ""
        return cycle, True

    @staticmethod
    def _since(
        b: Begun,
        source: Source,
        tokens: dict[str, str | None],
        prior: dict[str, str | None],
    ) -> dict[str, str | None]:
        """The change token each disk is read relative to.

        A resumed disk reads the changes since the interrupted snapshot (plus what it had
        not finished); if that token is gone, its progress is dropped and it starts over
        from the last good point's token."""
        since: dict[str, str | None] = {}
        for disk in b.vm.disks:
            tok: str | None = tokens.get(disk.name)
            old = prior.get(disk.name)
            if old and disk.name in b.progress and source.token_valid(b.vm, old):
                tok = old
            else:
                b.progress.pop(disk.name, None)
            since[disk.name] = tok if disk.change_tracking else None
        return since

    # ----------------------------------------------------------------- snapshot .. verify

    def _record_snapshot(self, cycle_id: int, snap: Snapshot) -> None:
        with self.ctx.state.session() as s:
            c = s.get(Cycle, cycle_id)
            assert c is not None
            c.snapshot_at = snap.taken_at
            c.consistency = snap.consistency.value
            c.snapshot_tokens = dict(snap.tokens)

    def _record_plan(self, cycle_id: int, jobs: list[DiskJob]) -> None:
        with self.ctx.state.session() as s:
            c = s.get(Cycle, cycle_id)
            assert c is not None
            # A resumed cycle keeps the kind its first run planned: an initial sync resumed
            # reads only what changed since its first snapshot, but it is the full sync.
            if not (c.resumed and c.kind):
                c.kind = cycle_kind(jobs)
            c.bytes_planned = planned_bytes(jobs)

    def _copy_and_verify(
        self,
        b: Begun,
        source: Source,
        target: Target,
        snap: Snapshot,
        writer: ReplicaWriter,
        jobs: list[DiskJob],
    ) -> None:
        workers = self.ctx.workers or max(
            1, min(source.capabilities.max_parallel_reads, target.capabilities.max_parallel_writes)
        )
        copier = Copier(
            self.ctx.state,
            b.cycle_id,
            source,
            snap,
            writer,
            workers=workers,
            throttle=Throttle(b.policy.bandwidth_mbps),
            progress=self.progress,
            cancel=self.cancel,
        )
        stats = copier.run(b.vm.name, jobs)
        self._lap("copy")
        note = verify(
            self.ctx.state,
            b.cycle_id,
            writer,
            jobs,
            verify_mode(b.policy, target),
            proof=target.capabilities.write_proof,
            workers=self.ctx.workers or 4,
        )
        self._lap("verify")
        if note:
            snap.notes.append(note)
        with self.ctx.state.session() as s:
            c = s.get(Cycle, b.cycle_id)
            assert c is not None
            c.phase = "commit"
            c.bytes_read += stats.read
            c.bytes_written += stats.written
            c.bytes_zeroed += stats.zeroed

    # ----------------------------------------------------------------- commit

    def finish(
        self,
        b: Begun,
        source: Source,
        target: Target,
        writer: ReplicaWriter | None,
        notes: list[str],
    ) -> CycleReport:
        """Seal the point at the target, make it visible, drop stale tokens, prune."""
        meta = commit.point_meta(self.ctx.state, b.cycle_id)
        if writer is not None:
            ref = writer.commit_point(b.cycle_id, meta)
            notes = [*notes, *writer.notes()]
        else:  # a resumed commit: the target's commit_point is idempotent
            with target.open_writer(b.pinfo, b.cycle_id, b.base) as w:
                ref = w.commit_point(b.cycle_id, meta)
        self._lap("seal")
        report, tokens = commit.make_visible(
            self.ctx.state, b.cycle_id, b.pinfo, ref, notes, self.started, b.resumed
        )
        self._lap("visible")
        report.phases = dict(self.phases)
        if self.on_point is not None:  # the point exists; what follows is housekeeping
            self.on_point(report)
        try:
            source.release_tokens(b.pinfo.vm, tokens)
        except StandbyError as exc:
            with self.ctx.state.session() as s:
                self.ctx.state.log(s, "warning", f"stale change tokens kept: {exc}", b.pinfo.id)
        retention.prune(self.ctx, b.pinfo.id)
        return report


def _app_due(s: Session, protection_id: int, policy: Policy) -> bool:
    """Whether the policy asks for an app-consistent point now."""
    every = policy.app_consistent_every_seconds
    if every <= 0:
        return False
    last = s.scalars(
        select(RecoveryPoint)
        .where(
            RecoveryPoint.protection_id == protection_id,
            RecoveryPoint.consistency == "app",
            RecoveryPoint.state == "visible",
        )
        .order_by(RecoveryPoint.id.desc())
    ).first()
    return last is None or datetime.now(UTC) - aware(last.created_at) >= timedelta(seconds=every)
