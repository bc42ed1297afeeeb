"""The replication engine: it owns the copy loop, threads, retries, progress and checkpoints.

One cycle: snapshot -> changed extents (or all allocated extents, hash-compared against the
last point's manifest) -> read -> checksum -> write, with bounded concurrency and memory ->
progress checkpoints (after a target flush) so an interrupted cycle resumes -> verify ->
commit the recovery point -> store the change tokens -> record the achieved RPO -> prune.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session
from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from standby.core import lifecycle, plugins
from standby.core.config import Policy, Site, get_site
from standby.core.errors import (
    CapabilityNotSupported,
    ConfigError,
    NotFound,
    StandbyError,
    TransientError,
)
from standby.core.extents import (
    BLOCK,
    UNKNOWN_DIGEST,
    ZERO_DIGEST,
    Intervals,
    Manifest,
    align_out,
    block_digest,
    normalize,
    pack,
    split,
    subtract,
    total,
    union,
    unpack,
)
from standby.core.interfaces import ReplicaWriter, Snapshot, Source, Target
from standby.core.lifecycle import _aware, point_info, protection_info
from standby.core.locks import FileLock
from standby.core.model import (
    Consistency,
    CostEstimate,
    Extent,
    PointInfo,
    ProtectionInfo,
    Usage,
    VMSpec,
)
from standby.core.state import (
    ChangeToken,
    Cycle,
    CycleDisk,
    Failover,
    PointDisk,
    Protection,
    RecoveryPoint,
    SiteRecord,
    State,
)

UNIT = 4 << 20
"""Largest piece read and written at once; memory in flight is bounded by workers x 2 x UNIT."""
CHECKPOINT_SECONDS = 2.0


class Progress(Protocol):
    """Where the engine reports progress (a rich bar in the CLI, nothing in tests)."""

    def start(self, description: str, total: int) -> None: ...
    def advance(self, amount: int) -> None: ...
    def finish(self) -> None: ...


class NullProgress:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def finish(self) -> None:
        pass


SAMPLE_UNITS = 16
"""Units (of UNIT bytes) per disk a sampled verification reads back."""


def verify_mode(policy: Policy, target: Target) -> str:
    """What `verify` means for this target: auto = full, or sample when writes are checked."""
    if policy.verify != "auto":
        return policy.verify
    return "sample" if target.capabilities.checked_writes else "full"


@dataclass
class CycleReport:
    """What one cycle did, for the CLI and benchmarks."""

    vm: str
    cycle_id: int
    point_id: int
    kind: str
    consistency: str
    resumed: bool
    bytes_planned: int
    bytes_read: int
    bytes_written: int
    bytes_zeroed: int
    seconds: float
    rpo_seconds: float | None
    notes: list[str] = field(default_factory=list)


class Throttle:
    """A shared token bucket for the policy's bandwidth limit (bytes per second)."""

    def __init__(self, mbps: float) -> None:
        self.rate = mbps * 1_000_000 / 8 if mbps > 0 else 0.0
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def consume(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
        delay = start - now
        if delay > 0:
            time.sleep(delay)


_retry = retry(
    retry=retry_if_exception_type(TransientError),
    stop=stop_after_attempt(4),
    wait=wait_exponential(multiplier=0.2, max=5),
    reraise=True,
)


@dataclass
class _DiskJob:
    """The state of one disk inside a running cycle."""

    name: str
    size: int
    mode: str
    plan: Intervals
    done_before: Intervals
    units: list[tuple[int, int]]
    manifest: Manifest
    done: bytearray
    written: list[tuple[int, int]] = field(default_factory=list)
    reconcile: bool = False
    """The base is a re-protect seed: blocks of unknown content are read back from the
    target and hashed (compare against the original disks) instead of being shipped blind."""


class Engine:
    """Runs protections, cycles and failovers against the state database and the plugins."""

    def __init__(
        self,
        state: State,
        home: Path,
        progress: Progress | None = None,
        workers: int | None = None,
        wait_for_lock: bool = False,
    ) -> None:
        self.state = state
        self.home = home
        self.progress = progress or NullProgress()
        self.workers = workers
        self.wait_for_lock = wait_for_lock
        self._plugins: dict[tuple[str, str], Source | Target] = {}
        self._plugins_lock = threading.RLock()

    # ----------------------------------------------------------------- plumbing

    def close(self) -> None:
        for plugin in self._plugins.values():
            with suppress(StandbyError):
                plugin.close()
        self._plugins.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def use(self, site_name: str, plugin: Source | Target) -> None:
        """Hand the engine an already-connected plugin for a site (tests, embedding)."""
        role = "source" if isinstance(plugin, Source) else "target"
        self._plugins[(site_name, role)] = plugin

    def site(self, name: str) -> Site:
        return get_site(name, self.home)

    def _plugin(self, site_name: str, role: str) -> Source | Target:
        """The connected plugin for a site in a role, opened once per engine."""
        key = (site_name, role)
        with self._plugins_lock:  # plan runs fail VMs of a group over from several threads
            return self._plugin_locked(key, site_name, role)

    def _plugin_locked(self, key: tuple[str, str], site_name: str, role: str) -> Source | Target:
        if key not in self._plugins:
            site = self.site(site_name)
            cls = plugins.source_class if role == "source" else plugins.target_class
            plugin = cls(site.plugin)(site)
            plugin.connect()
            self._plugins[key] = plugin
        return self._plugins[key]

    def source(self, site_name: str) -> Source:
        found = self._plugin(site_name, "source")
        assert isinstance(found, Source)
        return found

    def target(self, site_name: str) -> Target:
        found = self._plugin(site_name, "target")
        assert isinstance(found, Target)
        return found

    def lock(self, protection: Protection | str, what: str) -> FileLock:
        name = protection if isinstance(protection, str) else protection.vm_name
        return FileLock(
            self.home / "locks" / f"vm-{name}.lock", f"{what} of VM '{name}'", self.wait_for_lock
        )

    # ----------------------------------------------------------------- protect

    def protect(self, vm_key: str, source_site: str, target_site: str, policy: Policy) -> int:
        """Validate the VM against the target and record the protection (no data moves yet)."""
        for name in (source_site, target_site):
            self.site(name)
        with self.state.session() as s:
            exists = s.scalars(
                select(Protection).where(
                    (Protection.vm_name == vm_key) | (Protection.vm_id == vm_key)
                )
            ).first()
            if exists:
                raise ConfigError(
                    f"VM '{vm_key}' is already protected ({exists.source_site} -> "
                    f"{exists.target_site})"
                )
        source = self.source(source_site)
        target = self.target(target_site)
        vm = source.get_vm(vm_key)
        with self.lock(vm.name, "protection"):
            verdict = target.validate(vm)
            if not verdict.ok:
                raise CapabilityNotSupported(
                    f"VM '{vm.name}' cannot be protected to '{target_site}': "
                    + "; ".join(verdict.problems)
                )
            with self.state.session() as s:
                for site_name in (source_site, target_site):
                    if s.get(SiteRecord, site_name) is None:
                        s.add(SiteRecord(name=site_name, plugin=self.site(site_name).plugin))
                prot = Protection(
                    vm_id=vm.id,
                    vm_name=vm.name,
                    source_site=source_site,
                    target_site=target_site,
                    policy=policy.model_dump(),
                    spec=vm.to_dict(),
                    target_size=verdict.size,
                )
                s.add(prot)
                s.flush()
                target.prepare(protection_info(prot, vm))
                self.state.log(
                    s,
                    "protect",
                    f"protected {vm.name} from {source_site} to {target_site}",
                    prot.id,
                    notes=verdict.notes,
                )
                return prot.id

    def usage(self, vm_key: str | None = None, site: str | None = None) -> dict[str, list[Usage]]:
        """Per target site, what each protection holds there (from the engine's records)."""
        out: dict[str, list[Usage]] = {}
        with self.state.session() as s:
            if vm_key is not None:
                prots = [self.state.protection(s, vm_key)]
            else:
                prots = list(s.scalars(select(Protection).order_by(Protection.id)))
                if site is not None:
                    self.site(site)
                    prots = [p for p in prots if p.target_site == site]
            for prot in prots:
                visible = sorted(
                    (p for p in prot.points if p.state == "visible"), key=lambda p: p.id
                )
                replica = 0
                if visible:
                    for d in visible[-1].disks:
                        replica += total(Manifest.from_blob(d.size, d.manifest).nonzero())
                later = [s.get(Cycle, p.cycle_id) for p in visible[1:]]
                changed = sum(c.bytes_written + c.bytes_zeroed for c in later if c is not None)
                out.setdefault(prot.target_site, []).append(
                    Usage(protection_info(prot), replica, changed, len(visible), prot.target_size)
                )
        return out

    def cost(self, vm_key: str | None = None, site: str | None = None) -> list[CostEstimate]:
        """Cost estimates per target site (storage now, compute after failover)."""
        return [
            self.target(name).estimate_cost(usage)
            for name, usage in self.usage(vm_key, site).items()
        ]

    def unprotect(self, vm_key: str, keep_replicas: bool = False) -> int:
        """Stop protecting a VM: drop its replicas and points at the target (unless kept), its
        change tracking at the source, and its state. Refused while a test failover runs."""
        with self.state.session() as s:
            prot = self.state.protection(s, vm_key)
        with self.lock(prot, "unprotect"):
            with self.state.session() as s:
                prot = self.state.protection(s, vm_key)
                if _failovers(s, prot.id, UNCLEANED):
                    raise ConfigError(
                        f"VM '{prot.vm_name}' has a test failover; run "
                        f"`standby failover cleanup {prot.vm_name}` first"
                    )
                pinfo = protection_info(prot)
                points = [point_info(p) for p in prot.points if p.state != "pruned"]
            if not keep_replicas:
                self.target(pinfo.target_site).remove(pinfo, points)
            try:
                source = self.source(pinfo.source_site)
                source.release_tokens(source.get_vm(pinfo.vm.id), {})
            except NotFound:
                pass  # the VM is gone; so is its change tracking
            with self.state.session() as s:
                gone = s.get(Protection, pinfo.id)
                assert gone is not None
                cycles = s.scalars(select(Cycle).where(Cycle.protection_id == gone.id)).all()
                for c in cycles:
                    for row in s.scalars(select(CycleDisk).where(CycleDisk.cycle_id == c.id)):
                        s.delete(row)
                for t in s.scalars(select(ChangeToken).where(ChangeToken.protection_id == gone.id)):
                    s.delete(t)
                for f in s.scalars(select(Failover).where(Failover.protection_id == gone.id)):
                    s.delete(f)
                for p in gone.points:
                    for d in p.disks:
                        s.delete(d)
                    s.delete(p)
                s.flush()
                for c in cycles:
                    s.delete(c)
                s.delete(gone)
                self.state.log(
                    s,
                    "unprotect",
                    f"{pinfo.vm.name} unprotected ({len(points)} point(s) "
                    f"{'kept at' if keep_replicas else 'removed from'} {pinfo.target_site})",
                )
            return len(points)

    # ----------------------------------------------------------------- replicate

    def replicate(self, vm_key: str) -> CycleReport:
        """Run one cycle for a protection (resuming an interrupted one if there is one)."""
        with self.state.session() as s:
            prot = self.state.protection(s, vm_key)
        with self.lock(prot, "replication"):
            try:
                return self._cycle(prot.id)
            except StandbyError as exc:
                with self.state.session() as s:
                    running = s.scalars(
                        select(Cycle).where(
                            Cycle.protection_id == prot.id, Cycle.status == "running"
                        )
                    ).first()
                    if running is not None:
                        running.error = str(exc)
                    self.state.log(
                        s, "cycle-failed", f"{prot.vm_name}: {exc}", prot.id, level="error"
                    )
                raise

    def _cycle(self, protection_id: int) -> CycleReport:
        started = time.monotonic()
        with self.state.session() as s:
            prot = s.get(Protection, protection_id)
            assert prot is not None
            policy = Policy.model_validate(prot.policy)
            source = self.source(prot.source_site)
            target = self.target(prot.target_site)
            try:
                vm = source.get_vm(prot.vm_id)
            except NotFound:
                n = sum(1 for p in prot.points if p.state == "visible")
                self._set_health(
                    prot.id, "source-missing", f"source VM no longer exists at '{prot.source_site}'"
                )
                raise NotFound(
                    f"source VM '{prot.vm_name}' no longer exists at site '{prot.source_site}'; "
                    f"the protection and its {n} recovery point(s) are kept"
                ) from None
            if prot.state != "protected":
                raise ConfigError(
                    f"VM '{prot.vm_name}' is {prot.state}; replication is stopped until "
                    f"`standby reprotect {prot.vm_name}`"
                )
            old = VMSpec.from_dict(prot.spec)
            self._check_disks(prot, old, vm, target)
            base = self._latest_point(s, prot.id, with_seed=True)
            seeded = base is not None and base.state == "seed"
            base_info = point_info(base) if base else None
            tokens = {
                t.disk: t.token
                for t in s.scalars(select(ChangeToken).where(ChangeToken.protection_id == prot.id))
                if base is not None and t.point_id == base.id
            }
            cycle = s.scalars(
                select(Cycle).where(Cycle.protection_id == prot.id, Cycle.status == "running")
            ).first()
            if cycle is not None and cycle.base_point_id != (base.id if base else None):
                target.discard_pending(protection_info(prot, vm), cycle.id)
                cycle.status = "abandoned"
                cycle = None
            resumed = cycle is not None
            if cycle is None:
                cycle = Cycle(
                    protection_id=prot.id,
                    base_point_id=base.id if base else None,
                    pid=os.getpid(),
                )
                s.add(cycle)
                s.flush()
            else:
                cycle.resumed += 1
                cycle.pid = os.getpid()
                cycle.error = ""
            cycle_id = cycle.id
            phase = cycle.phase
            prior_tokens: dict[str, str | None] = dict(cycle.snapshot_tokens or {})
            want_app = self._app_due(s, prot.id, policy) and source.capabilities.app_consistent
            pinfo = protection_info(prot, vm)
            prev_manifests = self._manifests(base)
            progress_rows = {
                r.disk: r
                for r in s.scalars(select(CycleDisk).where(CycleDisk.cycle_id == cycle_id))
            }
            progress_state = {
                d: (r.mode, unpack(r.plan), unpack(r.done), Manifest.from_blob(r.size, r.manifest))
                for d, r in progress_rows.items()
            }
            vm_name = prot.vm_name

        if resumed and phase == "commit":
            return self._finish(cycle_id, pinfo, target, source, None, None, started, resumed=True)

        since: dict[str, str | None] = {}
        for disk in vm.disks:
            tok = tokens.get(disk.name)
            prior = prior_tokens.get(disk.name)
            if resumed and prior and disk.name in progress_state:
                # Changes since the interrupted snapshot, plus what it had not finished.
                if source.token_valid(vm, prior):
                    tok = prior
                else:
                    progress_state.pop(disk.name, None)
            else:
                progress_state.pop(disk.name, None)
            since[disk.name] = tok if disk.change_tracking else None

        consistency = Consistency.APP if want_app else Consistency.CRASH
        with source.open_snapshot(vm, consistency, since) as snap:
            with self.state.session() as s:
                c = s.get(Cycle, cycle_id)
                assert c is not None
                c.snapshot_at = snap.taken_at
                c.consistency = snap.consistency.value
                c.snapshot_tokens = dict(snap.tokens)
            with target.open_writer(pinfo, cycle_id, base_info) as writer:
                jobs = [
                    self._plan_disk(
                        source,
                        snap,
                        d.name,
                        d.size,
                        base_info,
                        prev_manifests,
                        progress_state.get(d.name),
                        seeded,
                    )
                    for d in vm.disks
                ]
                kinds = {j.mode for j in jobs}
                kind = (
                    "full"
                    if kinds == {"full"}
                    else (
                        "incremental"
                        if kinds <= {"incremental", "full"} and "incremental" in kinds
                        else "hashcompare"
                    )
                )
                with self.state.session() as s:
                    c = s.get(Cycle, cycle_id)
                    assert c is not None
                    c.kind = kind
                    c.bytes_planned = sum(total(j.plan) for j in jobs)
                stats = self._copy(cycle_id, vm_name, source, target, snap, writer, jobs, policy)
                note = self._verify(
                    cycle_id,
                    writer,
                    jobs,
                    verify_mode(policy, target),
                    checked=target.capabilities.checked_writes,
                )
                if note:
                    snap.notes.append(note)
                with self.state.session() as s:
                    c = s.get(Cycle, cycle_id)
                    assert c is not None
                    c.phase = "commit"
                    c.bytes_read += stats["read"]
                    c.bytes_written += stats["written"]
                    c.bytes_zeroed += stats["zeroed"]
                return self._finish(
                    cycle_id, pinfo, target, source, writer, snap, started, resumed=resumed
                )

    def _set_health(self, protection_id: int, health: str, reason: str) -> None:
        with self.state.session() as s:
            prot = s.get(Protection, protection_id)
            assert prot is not None
            prot.health = health
            prot.health_reason = reason

    def _check_disks(self, prot: Protection, old: VMSpec, vm: VMSpec, target: Target) -> None:
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

    def _latest_point(
        self, s: Session, protection_id: int, with_seed: bool = False
    ) -> RecoveryPoint | None:
        """The newest visible point (or, as a cycle's base, the re-protect seed before it)."""
        states = ("visible", "seed") if with_seed else ("visible",)
        return s.scalars(
            select(RecoveryPoint)
            .where(RecoveryPoint.protection_id == protection_id, RecoveryPoint.state.in_(states))
            .order_by(RecoveryPoint.id.desc())
        ).first()

    def _manifests(self, point: RecoveryPoint | None) -> dict[str, Manifest]:
        if point is None:
            return {}
        return {d.disk: Manifest.from_blob(d.size, d.manifest) for d in point.disks}

    def _app_due(self, s: Session, protection_id: int, policy: Policy) -> bool:
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
        return last is None or datetime.now(UTC) - _aware(last.created_at) >= timedelta(
            seconds=every
        )

    def _plan_disk(
        self,
        source: Source,
        snap: Snapshot,
        disk: str,
        size: int,
        base: PointInfo | None,
        prev: dict[str, Manifest],
        progress: tuple[str, Intervals, Intervals, Manifest] | None,
        seeded: bool = False,
    ) -> _DiskJob:
        """Decide what to read for one disk: changed extents, or all allocated + hash-compare."""
        extents = align_out(((e.offset, e.end) for e in source.changed_extents(snap, disk)), size)
        in_base = base is not None and disk in base.disks
        if snap.since.get(disk):
            mode = "incremental"
        elif in_base:
            mode = "hashcompare"
        else:
            mode = "full"
        if in_base:
            manifest = Manifest(prev[disk].size, prev[disk].data)
            manifest.resize(size)
            if mode == "hashcompare":
                # Blocks the replica holds but the source no longer has allocated must be zeroed.
                extents = union(extents, manifest.nonzero())
        else:
            manifest = Manifest(size)
        done_before: Intervals = []
        if progress is not None:
            _mode, old_plan, old_done, old_manifest = progress
            old_manifest.resize(size)
            manifest = old_manifest
            unfinished = subtract(old_plan, old_done)
            # What was in flight when the cycle stopped is unknown at the target: never skip it.
            manifest.invalidate(unfinished)
            done_before = subtract(old_done, extents)
            extents = union(unfinished, extents)
        units = split(extents, UNIT)
        return _DiskJob(
            name=disk,
            size=size,
            mode=mode,
            plan=normalize([*extents, *done_before]),
            done_before=done_before,
            units=units,
            manifest=manifest,
            done=bytearray(len(units)),
            reconcile=seeded,
        )

    def _copy(
        self,
        cycle_id: int,
        vm_name: str,
        source: Source,
        target: Target,
        snap: Snapshot,
        writer: ReplicaWriter,
        jobs: list[_DiskJob],
        policy: Policy,
    ) -> dict[str, int]:
        """The copy loop: bounded thread pool, bounded memory, periodic durable checkpoints."""
        workers = self.workers or max(
            1, min(source.capabilities.max_parallel_reads, target.capabilities.max_parallel_writes)
        )
        stats = {"read": 0, "written": 0, "zeroed": 0, "units": 0, "progress": 0}
        reported = 0
        lock = threading.Lock()
        throttle = Throttle(policy.bandwidth_mbps)
        read = _retry(source.read)
        write = _retry(writer.write)
        write_zeroes = _retry(writer.write_zeroes)
        todo = [(j, i) for j in jobs for i in range(len(j.units))]
        self.progress.start(f"{vm_name}: copying", sum(total(j.plan) for j in jobs))
        self.progress.advance(sum(total(j.done_before) for j in jobs))

        def work(job: _DiskJob, index: int) -> None:
            start, end = job.units[index]
            data = read(snap, job.name, Extent(start, end - start))
            if len(data) != end - start:
                raise TransientError(
                    f"short read on disk '{job.name}' at {start}: {len(data)} of {end - start}"
                )
            view = memoryview(data)
            if job.reconcile:
                self._reconcile(writer, job, start, end)
            digests: list[tuple[int, bytes]] = []
            runs: list[tuple[bool, int, int]] = []  # (is_zero, start, end) to write
            for off in range(start, end, BLOCK):
                blk = view[off - start : min(end, off + BLOCK) - start]
                digest = block_digest(blk)
                idx = off // BLOCK
                if digest == job.manifest.get(idx):
                    continue
                digests.append((idx, digest))
                is_zero = digest == ZERO_DIGEST
                blk_end = off + len(blk)
                if runs and runs[-1][0] == is_zero and runs[-1][2] == off:
                    runs[-1] = (is_zero, runs[-1][1], blk_end)
                else:
                    runs.append((is_zero, off, blk_end))
            written = zeroed = 0
            for is_zero, rs, re_ in runs:
                if is_zero:
                    write_zeroes(job.name, Extent(rs, re_ - rs))
                    zeroed += re_ - rs
                else:
                    throttle.consume(re_ - rs)
                    write(job.name, rs, view[rs - start : re_ - start])
                    written += re_ - rs
            with lock:
                for idx, digest in digests:
                    job.manifest.set(idx, digest)
                job.done[index] = 1
                job.written.extend((rs, re_) for _z, rs, re_ in runs)
                stats["read"] += end - start
                stats["written"] += written
                stats["zeroed"] += zeroed
                stats["units"] += 1
                stats["progress"] += end - start

        last_checkpoint = time.monotonic()
        pending: set[Future[None]] = set()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="standby-copy") as pool:
            it = iter(todo)
            exhausted = False
            try:
                while True:
                    while not exhausted and len(pending) < workers * 2:
                        nxt = next(it, None)
                        if nxt is None:
                            exhausted = True
                            break
                        pending.add(pool.submit(work, *nxt))
                    if not pending:
                        break
                    finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        fut.result()
                    with lock:
                        now_done = stats["progress"]
                    self.progress.advance(now_done - reported)
                    reported = now_done
                    if time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS:
                        self._checkpoint(cycle_id, writer, jobs, lock)
                        last_checkpoint = time.monotonic()
            except BaseException:
                for fut in pending:
                    fut.cancel()
                wait(pending)
                try:
                    self._checkpoint(cycle_id, writer, jobs, lock)
                except Exception:  # the original error matters more
                    pass
                self.progress.finish()
                raise
        self._checkpoint(cycle_id, writer, jobs, lock)
        self.progress.finish()
        return stats

    @staticmethod
    def _reconcile(writer: ReplicaWriter, job: _DiskJob, start: int, end: int) -> None:
        """Learn what the target holds where the seed manifest does not know (one read)."""
        first, last = start // BLOCK, -(-end // BLOCK)
        if all(job.manifest.get(i) != UNKNOWN_DIGEST for i in range(first, last)):
            return
        held = memoryview(writer.read(job.name, Extent(start, end - start)))
        for i in range(first, last):
            if job.manifest.get(i) == UNKNOWN_DIGEST:
                lo = i * BLOCK - start
                job.manifest.set(i, block_digest(held[lo : min(end - start, lo + BLOCK)]))

    def _checkpoint(
        self, cycle_id: int, writer: ReplicaWriter, jobs: list[_DiskJob], lock: threading.Lock
    ) -> None:
        """Persist progress; only units whose writes the target has flushed count as done."""
        with lock:
            snapshot = [(j, bytes(j.done), bytes(j.manifest.data)) for j in jobs]
        writer.flush()
        with self.state.session() as s:
            for job, done, manifest in snapshot:
                done_ranges = normalize(
                    [*job.done_before, *(job.units[k] for k, f in enumerate(done) if f)]
                )
                row = s.get(CycleDisk, (cycle_id, job.name))
                m = Manifest(job.size, manifest)
                if row is None:
                    s.add(
                        CycleDisk(
                            cycle_id=cycle_id,
                            disk=job.name,
                            mode=job.mode,
                            size=job.size,
                            plan=pack(job.plan),
                            done=pack(done_ranges),
                            manifest=m.to_blob(),
                        )
                    )
                else:
                    row.mode = job.mode
                    row.size = job.size
                    row.plan = pack(job.plan)
                    row.done = pack(done_ranges)
                    row.manifest = m.to_blob()

    def _verify(
        self,
        cycle_id: int,
        writer: ReplicaWriter,
        jobs: list[_DiskJob],
        mode: str,
        *,
        checked: bool = False,
    ) -> str:
        """Read back what this cycle wrote and compare with the manifest before any commit.

        Returns a note for the point when less than everything was read back."""
        written = sum(total(normalize(j.written)) for j in jobs)
        if mode == "none":
            how = "; every write checked by the service (Content-MD5)" if checked else ""
            return f"verify: none (policy), {written} written bytes not read back{how}"
        bad: dict[str, Intervals] = {}
        work: list[tuple[_DiskJob, int, int]] = []
        for job in jobs:
            ranges = split(normalize(job.written), UNIT)
            if mode == "sample" and ranges:
                rng = random.Random(cycle_id)
                ranges = sorted(rng.sample(ranges, max(1, min(len(ranges), SAMPLE_UNITS))))
            work += [(job, start, end) for start, end in ranges]

        def check(item: tuple[_DiskJob, int, int]) -> list[tuple[str, int, int]]:
            job, start, end = item
            data = memoryview(writer.read(job.name, Extent(start, end - start)))
            wrong = []
            for off in range(start, end, BLOCK):
                blk = data[off - start : min(end, off + BLOCK) - start]
                if block_digest(blk) != job.manifest.get(off // BLOCK):
                    wrong.append((job.name, off, off + len(blk)))
            return wrong

        with ThreadPoolExecutor(max_workers=self.workers or 4) as pool:
            for wrong in pool.map(check, work):
                for name, off, end in wrong:
                    bad.setdefault(name, []).append((off, end))
        if bad:
            lock = threading.Lock()
            for job in jobs:
                if job.name in bad:
                    ranges = normalize(bad[job.name])
                    job.manifest.invalidate(ranges)
                    for k, unit in enumerate(job.units):
                        if subtract([unit], ranges) != [unit]:
                            job.done[k] = 0
                    job.done_before = subtract(job.done_before, ranges)
            self._checkpoint(cycle_id, writer, jobs, lock)
            names = ", ".join(f"{d} ({total(r)} bytes)" for d, r in bad.items())
            raise TransientError(
                f"verification failed on {names}; no point was made, the next cycle rewrites them"
            )
        if mode == "full" or not written:
            return ""
        sampled = sum(end - start for _, start, end in work)
        how = "every write checked by the service (Content-MD5), " if checked else ""
        return f"verify: {how}{sampled} of {written} written bytes read back and compared"

    def _point_meta(self, cycle_id: int) -> dict[str, Any]:
        """The engine's record of a point about to be sealed, for targets that store it."""
        with self.state.session() as s:
            c = s.get(Cycle, cycle_id)
            assert c is not None
            rows = s.scalars(select(CycleDisk).where(CycleDisk.cycle_id == cycle_id))
            return {
                "cycle": cycle_id,
                "taken_at": _aware(c.snapshot_at).isoformat() if c.snapshot_at else None,
                "consistency": c.consistency,
                "block_size": BLOCK,
                "disks": {
                    r.disk: {
                        "size": r.size,
                        "manifest_blake3": Manifest.from_blob(r.size, r.manifest).digest(),
                    }
                    for r in rows
                },
            }

    def _finish(
        self,
        cycle_id: int,
        pinfo: ProtectionInfo,
        target: Target,
        source: Source,
        writer: ReplicaWriter | None,
        snap: Snapshot | None,
        started: float,
        resumed: bool,
    ) -> CycleReport:
        """Seal the point at the target, then make it visible in one transaction."""
        meta = self._point_meta(cycle_id)
        if writer is not None:
            ref = writer.commit_point(cycle_id, meta)
        else:
            base = None
            with self.state.session() as s:
                c = s.get(Cycle, cycle_id)
                assert c is not None
                if c.base_point_id:
                    bp = s.get(RecoveryPoint, c.base_point_id)
                    base = point_info(bp) if bp else None
            with target.open_writer(pinfo, cycle_id, base) as w:
                ref = w.commit_point(cycle_id, meta)
        now = datetime.now(UTC)
        with self.state.session() as s:
            c = s.get(Cycle, cycle_id)
            assert c is not None and c.snapshot_at is not None
            rows = {
                r.disk: r for r in s.scalars(select(CycleDisk).where(CycleDisk.cycle_id == c.id))
            }
            missing = [d.name for d in pinfo.vm.disks if d.name not in rows]
            if missing:
                raise StandbyError(f"cycle {c.id} has no progress for disk(s) {missing}")
            point = RecoveryPoint(
                protection_id=pinfo.id,
                cycle_id=c.id,
                created_at=_aware(c.snapshot_at),
                consistency=c.consistency,
                ref=ref,
                notes="; ".join(snap.notes) if snap else "",
            )
            s.add(point)
            s.flush()
            for disk in pinfo.vm.disks:
                row = rows[disk.name]
                manifest = Manifest.from_blob(row.size, row.manifest)
                if manifest.has_unknown():
                    raise StandbyError(
                        f"disk '{disk.name}' has blocks of unknown content; point not made"
                    )
                s.add(
                    PointDisk(
                        point_id=point.id,
                        disk=disk.name,
                        size=row.size,
                        block_size=BLOCK,
                        manifest=row.manifest,
                        digest=manifest.digest(),
                    )
                )
            tokens = dict(c.snapshot_tokens or {})
            for t in s.scalars(select(ChangeToken).where(ChangeToken.protection_id == pinfo.id)):
                s.delete(t)
            s.flush()
            for disk_name, token in tokens.items():
                s.add(
                    ChangeToken(
                        protection_id=pinfo.id, disk=disk_name, token=token, point_id=point.id
                    )
                )
            for r in rows.values():
                s.delete(r)
            prev = s.get(RecoveryPoint, c.base_point_id) if c.base_point_id is not None else None
            rpo = (now - _aware(prev.created_at)).total_seconds() if prev else None
            c.status = "complete"
            c.finished_at = now
            c.rpo_seconds = rpo
            prot = s.get(Protection, pinfo.id)
            assert prot is not None
            prot.health = "ok"
            prot.health_reason = ""
            self.state.log(
                s,
                "point",
                f"{pinfo.vm.name}: recovery point {point.id} ({c.kind}, {c.consistency}) "
                f"written {c.bytes_written} bytes",
                pinfo.id,
                cycle=c.id,
                point=point.id,
            )
            report = CycleReport(
                vm=pinfo.vm.name,
                cycle_id=c.id,
                point_id=point.id,
                kind=c.kind,
                consistency=c.consistency,
                resumed=resumed or c.resumed > 0,
                bytes_planned=c.bytes_planned,
                bytes_read=c.bytes_read,
                bytes_written=c.bytes_written,
                bytes_zeroed=c.bytes_zeroed,
                seconds=time.monotonic() - started,
                rpo_seconds=rpo,
                notes=list(snap.notes) if snap else [],
            )
        try:
            source.release_tokens(pinfo.vm, tokens)
        except StandbyError as exc:
            with self.state.session() as s:
                self.state.log(s, "warning", f"stale change tokens kept: {exc}", pinfo.id)
        self.prune(pinfo.vm.name)
        return report

    # ----------------------------------------------------------------- retention

    def prune(self, vm_key: str) -> list[int]:
        """Apply the policy's retention; points used by a running failover are kept."""
        with self.state.session() as s:
            prot = self.state.protection(s, vm_key)
            active = _failovers(s, prot.id, ACTIVE)
            policy = Policy.model_validate(prot.policy)
            points = [p for p in prot.points if p.state in ("visible", "pruning")]
            visible = [p for p in points if p.state == "visible"]
            now = datetime.now(UTC)
            drop_ids = {p.id for p in points if p.state == "pruning"}
            if not active:
                keep_n = visible[-policy.retain_count :]
                for p in visible[:-1]:
                    too_old = now - _aware(p.created_at) > timedelta(
                        seconds=policy.retain_age_seconds
                    )
                    if p not in keep_n or too_old:
                        drop_ids.add(p.id)
            if not drop_ids:
                return []
            for p in points:
                if p.id in drop_ids:
                    p.state = "pruning"
            drop = [point_info(p) for p in points if p.id in drop_ids]
            keep = [point_info(p) for p in points if p.id not in drop_ids]
            pinfo = protection_info(prot)
        moved = self.target(pinfo.target_site).prune(pinfo, drop, keep)
        with self.state.session() as s:
            for p_id in drop_ids:
                dropped = s.get(RecoveryPoint, p_id)
                assert dropped is not None
                dropped.state = "pruned"
            for p_id, ref in moved.items():
                kept = s.get(RecoveryPoint, p_id)
                assert kept is not None
                kept.ref = ref
            self.state.log(s, "prune", f"pruned points {sorted(drop_ids)}", pinfo.id)
        return sorted(drop_ids)

    # ----------------------------------------------------------------- failover

    def failover(
        self,
        vm_key: str,
        *,
        test: bool = False,
        kind: str | None = None,
        point_id: int | None = None,
        network: str | None = None,
        run_id: int | None = None,
    ) -> Failover:
        """Start a VM at the target from a recovery point (see `standby.core.lifecycle`)."""
        return lifecycle.failover(
            self,
            vm_key,
            kind or ("test" if test else "unplanned"),
            point_id=point_id,
            network=network,
            run_id=run_id,
        )

    def _stepper(self, protection_id: int, failover_id: int) -> Any:
        """A callback that records a failover step as an event and shows it as progress."""

        def step(message: str) -> None:
            self.progress.finish()
            self.progress.start(message, 0)
            with self.state.session() as s:
                self.state.log(
                    s, "failover-step", f"failover {failover_id}: {message}", protection_id
                )

        return step

    def cleanup(self, vm_key: str) -> list[int]:
        """Remove every test failover of a VM (idempotent)."""
        return lifecycle.cleanup(self, vm_key)

    def commit(self, vm_key: str) -> Failover:
        return lifecycle.commit(self, vm_key)

    def reprotect(self, vm_key: str) -> Protection:
        return lifecycle.reprotect(self, vm_key)

    def failback(self, vm_key: str) -> Failover:
        return lifecycle.failback(self, vm_key)


_failovers = lifecycle.failovers
ACTIVE, UNCLEANED = lifecycle.ACTIVE, lifecycle.UNCLEANED


def status_rows(state: State, home: Path | None = None) -> list[dict[str, Any]]:
    """RPO and health per protection (for `standby status`).

    With `home`, a `running` cycle whose VM lock nobody holds is reported as `resumable`
    (its process died), not as `replicating`.
    """
    rows: list[dict[str, Any]] = []
    now = datetime.now(UTC)
    with state.session() as s:
        for prot in s.scalars(select(Protection).order_by(Protection.id)):
            visible = [p for p in prot.points if p.state == "visible"]
            latest = visible[-1] if visible else None
            policy = Policy.model_validate(prot.policy)
            rpo = (now - _aware(latest.created_at)).total_seconds() if latest else None
            last_cycle = s.scalars(
                select(Cycle).where(Cycle.protection_id == prot.id).order_by(Cycle.id.desc())
            ).first()
            health = prot.health
            reason = prot.health_reason
            if health == "ok":
                if latest is None:
                    health, reason = "initial-sync-pending", "no recovery point yet"
                elif rpo is not None and rpo > policy.rpo_seconds:
                    health, reason = "rpo-breached", f"latest point is {int(rpo)}s old"
                if last_cycle is not None and last_cycle.status == "running":
                    alive = home is None or FileLock.held(
                        home / "locks" / f"vm-{prot.vm_name}.lock"
                    )
                    if last_cycle.error or not alive:
                        health = "resumable"
                        reason = last_cycle.error or "a cycle was interrupted; replicate resumes it"
                    else:
                        health, reason = "replicating", f"cycle {last_cycle.id} in progress"
            rows.append(
                {
                    "vm": prot.vm_name,
                    "source": prot.source_site,
                    "target": prot.target_site,
                    "state": prot.state,
                    "points": len(visible),
                    "latest_point": latest.id if latest else None,
                    "latest_point_time": _aware(latest.created_at).isoformat() if latest else None,
                    "rpo_seconds": round(rpo, 1) if rpo is not None else None,
                    "rpo_target_seconds": policy.rpo_seconds,
                    "health": health,
                    "reason": reason,
                    "last_cycle": (
                        {
                            "id": last_cycle.id,
                            "status": last_cycle.status,
                            "kind": last_cycle.kind,
                            "bytes_written": last_cycle.bytes_written,
                            "error": last_cycle.error,
                        }
                        if last_cycle
                        else None
                    ),
                }
            )
    return rows


def due(state: State, home: Path | None = None) -> list[str]:
    """Protections whose latest point is older than half their RPO target (for --watch)."""
    out = []
    for row in status_rows(state, home):
        if row["state"] != "protected" or row["health"] == "source-missing":
            continue
        if row["rpo_seconds"] is None or row["rpo_seconds"] >= row["rpo_target_seconds"] / 2:
            out.append(str(row["vm"]))
    return out


@contextmanager
def opened(home: Path, progress: Progress | None = None, **kw: Any) -> Iterator[Engine]:
    """An engine over the state in `home`, closing plugin connections at the end."""
    url = os.environ.get("STANDBY_DB_URL")
    state = State(url) if url else State.at(home)
    engine = Engine(state, home, progress, **kw)
    try:
        yield engine
    finally:
        engine.close()
        state.dispose()
