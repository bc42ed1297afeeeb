"""The failover lifecycle: test, planned and unplanned failover, commit, re-protect, failback.

A protection moves through `protected` -> (planned/unplanned failover) `failed-over` ->
(`commit`) `committed` -> (`reprotect`: the direction swaps, generation + 1) `protected` ->
(`failback` = a planned failover home) `failed-over` -> `committed` -> `reprotect` ... Test
failovers leave the state alone. Every failover is a `Failover` row written before the target
is touched, so a killed run leaves a record that `failover cleanup` or a resumed plan run finds.
"""

from __future__ import annotations

import time
from contextlib import suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.core import plugins
from standby.core.config import Policy
from standby.core.errors import (
    CapabilityNotSupported,
    ConfigError,
    NotFound,
    StandbyError,
    TransientError,
)
from standby.core.extents import Manifest
from standby.core.model import PointInfo, ProtectionInfo, VMSpec
from standby.core.state import ChangeToken, Cycle, Failover, PointDisk, Protection, RecoveryPoint

if TYPE_CHECKING:
    from standby.core.engine import Engine

KINDS = ("test", "planned", "unplanned")
ACTIVE = ("starting", "running")
"""Failover states whose VM is (or may be) up at the target."""
UNCLEANED = (*ACTIVE, "failed")
"""Failover states that may have left something at the target for `cleanup`."""


def _aware(t: datetime) -> datetime:
    """SQLite hands back naive datetimes; they are UTC."""
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def failovers(s: Session, protection_id: int, states: tuple[str, ...]) -> list[Failover]:
    """A protection's failovers in the given states, oldest first."""
    return list(
        s.scalars(
            select(Failover)
            .where(Failover.protection_id == protection_id, Failover.state.in_(states))
            .order_by(Failover.id)
        )
    )


def point_info(p: RecoveryPoint) -> PointInfo:
    """A point as handed to a target."""
    return PointInfo(
        id=p.id,
        created_at=_aware(p.created_at),
        ref=dict(p.ref),
        disks={d.disk: d.size for d in p.disks},
    )


def protection_info(p: Protection, vm: VMSpec | None = None) -> ProtectionInfo:
    """A protection as handed to a target."""
    return ProtectionInfo(
        id=p.id,
        vm=vm or VMSpec.from_dict(p.spec),
        source_site=p.source_site,
        target_site=p.target_site,
    )


def failover(
    engine: Engine,
    vm_key: str,
    kind: str,
    *,
    point_id: int | None = None,
    network: str | None = None,
    run_id: int | None = None,
) -> Failover:
    """Start the VM at the target: test (isolated), planned (zero loss) or unplanned."""
    if kind not in KINDS:
        raise ConfigError(f"failover kind must be one of {', '.join(KINDS)}, not '{kind}'")
    with engine.state.session() as s:
        prot = engine.state.protection(s, vm_key)
    with engine.lock(prot, "failover"):
        with engine.state.session() as s:
            prot = engine.state.protection(s, vm_key)
            if run_id is not None:  # a resumed plan run: never start the same failover twice
                again = s.scalars(
                    select(Failover).where(
                        Failover.protection_id == prot.id,
                        Failover.run_id == run_id,
                        Failover.kind == kind,
                        Failover.state.in_(ACTIVE),
                    )
                ).first()
                if again is not None and again.state == "running":
                    return again
                if again is not None:  # killed part-way: remove what it may have made
                    again.state = "failed"
                    again.error = "interrupted; started again by the resumed run"
                    leftover = {"failover_id": again.id, "kind": kind, **dict(again.ref or {})}
                    engine.target(prot.target_site).cleanup_test(protection_info(prot), leftover)
                    again.state = "cleaned"
            _check_can_fail_over(s, prot, kind)
            policy = Policy.model_validate(prot.policy)
            name = prot.vm_name
        if kind == "planned":
            point_id = _final_cycle(engine, name, policy)
        with engine.state.session() as s:
            prot = engine.state.protection(s, vm_key)
            point = _choose_point(engine, s, prot, point_id)
            now = datetime.now(UTC)
            fo = Failover(
                protection_id=prot.id,
                point_id=point.id,
                kind=kind,
                run_id=run_id,
                point_time=point.created_at,
                data_loss_seconds=(
                    0.0 if kind == "planned" else (now - _aware(point.created_at)).total_seconds()
                ),
            )
            s.add(fo)
            s.flush()
            fo_id = fo.id
            pinfo = protection_info(prot)
            pt = point_info(point)
            size = prot.target_size
            loss = (
                ""
                if kind != "unplanned"
                else f"; data-loss window {fo.data_loss_seconds:.0f}s (point taken "
                f"{_aware(point.created_at).isoformat(timespec='seconds')})"
            )
            engine.state.log(
                s,
                "failover",
                f"{kind} failover of {name} from point {point.id} started{loss}",
                prot.id,
            )
        target = engine.target(pinfo.target_site)
        target.on_step = engine._stepper(pinfo.id, fo_id)
        try:
            result = target.failover(
                pinfo, pt, test=kind == "test", network=network, size=size, failover_id=fo_id
            )
        except BaseException as exc:
            with engine.state.session() as s:
                f = s.get(Failover, fo_id)
                assert f is not None
                f.state = "failed"
                f.error = str(exc)
                f.finished_at = datetime.now(UTC)
            with suppress(StandbyError):
                target.cleanup_test(pinfo, {"failover_id": fo_id, "kind": kind})
            raise
        finally:
            engine.progress.finish()
        with engine.state.session() as s:
            f = s.get(Failover, fo_id)
            assert f is not None
            f.state = "running"
            f.running_at = datetime.now(UTC)
            f.ref = {**result.ref, "kind": kind}
            f.vm_name = result.vm_name
            if kind != "test":
                p = s.get(Protection, pinfo.id)
                assert p is not None
                p.state = "failed-over"
            engine.state.log(s, "failover", result.summary, pinfo.id)
            return f


def _check_can_fail_over(s: Session, prot: Protection, kind: str) -> None:
    active = failovers(s, prot.id, ACTIVE)
    if prot.state != "protected":
        real = next((f for f in active if f.kind != "test"), None)
        where = f" (failover {real.id}, {real.kind}, at '{prot.target_site}')" if real else ""
        raise ConfigError(
            f"VM '{prot.vm_name}' has already failed over{where}; "
            + (
                f"commit it, then `standby reprotect {prot.vm_name}`"
                if prot.state == "failed-over"
                else f"run `standby reprotect {prot.vm_name}` first"
            )
        )
    tests = [f for f in active if f.kind == "test"]
    if tests:
        raise ConfigError(
            f"VM '{prot.vm_name}' has a test failover running (failover {tests[0].id}); run "
            f"`standby failover cleanup {prot.vm_name}` first"
        )


def _choose_point(
    engine: Engine, s: Session, prot: Protection, point_id: int | None
) -> RecoveryPoint:
    if point_id is None:
        point = engine._latest_point(s, prot.id)
        if point is None:
            raise NotFound(f"VM '{prot.vm_name}' has no recovery point yet")
        return point
    point = s.get(RecoveryPoint, point_id)
    if point is None or point.protection_id != prot.id or point.state != "visible":
        raise NotFound(f"recovery point {point_id} does not exist for VM '{prot.vm_name}'")
    return point


def _final_cycle(engine: Engine, vm_key: str, policy: Policy) -> int:
    """Shut the source VM down, replicate what is left, prove nothing changed since."""
    with engine.state.session() as s:
        prot = engine.state.protection(s, vm_key)
        pinfo = protection_info(prot)
    source = engine.source(pinfo.source_site)
    try:
        vm = source.get_vm(pinfo.vm.id)
    except NotFound as exc:
        raise NotFound(f"{exc}; a planned failover needs the source VM: use --unplanned") from None
    if vm.power_state != "shutoff":
        engine.progress.start(f"shutting {vm.name} down at '{pinfo.source_site}'", 0)
        source.power_off(vm)
        deadline = time.monotonic() + policy.shutdown_timeout_seconds
        while source.get_vm(vm.id).power_state != "shutoff":
            if time.monotonic() > deadline:
                with engine.state.session() as s:
                    engine.state.log(
                        s,
                        "warning",
                        f"{vm.name} did not shut down in {policy.shutdown_timeout_seconds}s; "
                        "powered off",
                        pinfo.id,
                        level="warning",
                    )
                source.power_off(vm, force=True)
                break
            time.sleep(0.5)
        engine.progress.finish()
    with engine.state.session() as s:
        engine.state.log(s, "failover", f"{vm.name} is off at '{pinfo.source_site}'", pinfo.id)
    report = engine._cycle(pinfo.id)
    _prove_no_changes(engine, pinfo.id)
    with engine.state.session() as s:
        engine.state.log(
            s,
            "failover",
            f"final point {report.point_id} of {vm.name}: nothing changed after it (zero loss)",
            pinfo.id,
        )
    assert report.point_id is not None
    return report.point_id


def _prove_no_changes(engine: Engine, protection_id: int) -> None:
    """After the final cycle of a stopped VM, the source must report no change since it."""
    from standby.core.model import Consistency

    with engine.state.session() as s:
        prot = s.get(Protection, protection_id)
        assert prot is not None
        tokens = {
            t.disk: t.token
            for t in s.scalars(select(ChangeToken).where(ChangeToken.protection_id == prot.id))
        }
        pinfo = protection_info(prot)
    source = engine.source(pinfo.source_site)
    vm = source.get_vm(pinfo.vm.id)
    tracked = {d.name: tokens.get(d.name) for d in vm.disks if d.change_tracking}
    if not all(tracked.values()):
        return  # untracked disks were hash-compared in full by the final cycle itself
    with source.open_snapshot(vm, Consistency.CRASH, tracked) as snap:
        changed = {d: sum(e.length for e in source.changed_extents(snap, d)) for d in tracked}
    if any(changed.values()):
        raise TransientError(
            f"VM '{vm.name}' changed after its final point ({changed}); planned failover stopped"
        )


def cleanup(engine: Engine, vm_key: str) -> list[int]:
    """Remove every test failover of a VM (and what failed failovers left); idempotent."""
    with engine.state.session() as s:
        prot = engine.state.protection(s, vm_key)
    with engine.lock(prot, "failover cleanup"):
        with engine.state.session() as s:
            rows = [
                f
                for f in failovers(s, prot.id, UNCLEANED)
                if f.kind == "test" or f.state == "failed"
            ]
            work = [(f.id, {"failover_id": f.id, "kind": f.kind, **dict(f.ref)}) for f in rows]
            pinfo = protection_info(prot)
        if not work:
            raise NotFound(f"VM '{prot.vm_name}' has no test failover to clean up")
        target = engine.target(pinfo.target_site)
        for fo_id, ref in work:
            target.on_step = engine._stepper(pinfo.id, fo_id)
            target.cleanup_test(pinfo, ref)
            engine.progress.finish()
            with engine.state.session() as s:
                f = s.get(Failover, fo_id)
                assert f is not None
                f.state = "cleaned"
                f.finished_at = datetime.now(UTC)
                engine.state.log(s, "cleanup", f"{f.kind} failover {fo_id} cleaned up", pinfo.id)
        return [w[0] for w in work]


def _active_real(s: Session, prot: Protection) -> Failover:
    real = next((f for f in failovers(s, prot.id, ("running",)) if f.kind != "test"), None)
    if real is None:
        raise ConfigError(f"VM '{prot.vm_name}' has no failover to act on")
    return real


def commit(engine: Engine, vm_key: str) -> Failover:
    """Finish a failover: earlier points can no longer be chosen; the target frees them."""
    with engine.state.session() as s:
        prot = engine.state.protection(s, vm_key)
    with engine.lock(prot, "commit"):
        with engine.state.session() as s:
            prot = engine.state.protection(s, vm_key)
            if prot.state == "committed":
                fo = _active_real(s, prot)
                return fo  # already done (idempotent for resumed runs)
            if prot.state != "failed-over":
                raise ConfigError(f"VM '{prot.vm_name}' has not failed over; nothing to commit")
            fo = _active_real(s, prot)
            used = s.get(RecoveryPoint, fo.point_id)
            assert used is not None
            others = [p for p in prot.points if p.state == "visible" and p.id != used.id]
            pinfo, keep, drop, ref = (
                protection_info(prot),
                point_info(used),
                [point_info(p) for p in others],
                fo.ref,
            )
        engine.target(pinfo.target_site).commit_failover(pinfo, dict(ref), keep, drop)
        with engine.state.session() as s:
            prot = engine.state.protection(s, vm_key)
            for p in prot.points:
                if p.id in {d.id for d in drop}:
                    p.state = "released"
            fo = _active_real(s, prot)
            fo.committed_at = datetime.now(UTC)
            prot.state = "committed"
            engine.state.log(
                s,
                "commit",
                f"failover {fo.id} of {prot.vm_name} committed at '{prot.target_site}' "
                f"({len(drop)} other point(s) released)",
                prot.id,
            )
            return fo


def reprotect(engine: Engine, vm_key: str) -> Protection:
    """Replicate the failed-over VM back to the site it came from, seeded from the disks there."""
    with engine.state.session() as s:
        prot = engine.state.protection(s, vm_key)
    with engine.lock(prot, "reprotect"):
        with engine.state.session() as s:
            prot = engine.state.protection(s, vm_key)
            if prot.state == "protected":
                return prot  # already re-protected (idempotent for resumed runs)
            if prot.state == "failed-over":
                raise ConfigError(
                    f"commit the failover of '{prot.vm_name}' first: `standby commit "
                    f"{prot.vm_name}`"
                )
            fo = _active_real(s, prot)
            used = s.get(RecoveryPoint, fo.point_id)
            assert used is not None
            old = protection_info(prot)
            fo_kind, fo_vm, used_id = fo.kind, fo.vm_name, used.id
        new_source_site, new_target_site = old.target_site, old.source_site
        for site_name, role in ((new_source_site, "source"), (new_target_site, "target")):
            plugin = engine.site(site_name).plugin
            known = plugins.list_plugins()
            if not any(p.name == plugin and p.role == role for p in known):
                raise CapabilityNotSupported(
                    f"site '{site_name}' (plugin {plugin}) cannot be a replication {role}; "
                    f"re-protecting {old.vm.name} from it is not supported"
                )
        source = engine.source(new_source_site)
        target = engine.target(new_target_site)
        vm = source.get_vm(fo_vm)
        verdict = target.validate(vm)
        if not verdict.ok:
            raise CapabilityNotSupported(
                f"VM '{vm.name}' cannot be protected back to '{new_target_site}': "
                + "; ".join(verdict.problems)
            )
        new = ProtectionInfo(old.id, vm, new_source_site, new_target_site)
        seed_ref = target.seed(new, old.vm)
        with engine.state.session() as s:
            prot = engine.state.protection(s, vm_key)
            used = s.get(RecoveryPoint, used_id)
            assert used is not None
            for p in prot.points:
                if p.state in ("visible", "seed", "pruning"):
                    p.state = "retired"
            for t in s.scalars(select(ChangeToken).where(ChangeToken.protection_id == prot.id)):
                s.delete(t)
            prot.home_site = prot.home_site or old.source_site
            prot.source_site, prot.target_site = new_source_site, new_target_site
            prot.vm_id, prot.spec, prot.target_size = vm.id, vm.to_dict(), verdict.size
            prot.generation += 1
            prot.state = "protected"
            prot.health, prot.health_reason = "ok", ""
            if seed_ref is not None:
                # A target may seed with data it cannot vouch for ("exact": False): the engine
                # then reads it back before deciding what to ship.
                exact = fo_kind == "planned" and seed_ref.get("exact", True) is not False
                _add_seed(s, prot, used, seed_ref, vm, exact=exact)
            fo = _active_real(s, prot)
            fo.state = "reprotected"
            fo.finished_at = datetime.now(UTC)
            engine.state.log(
                s,
                "reprotect",
                f"{vm.name} re-protected: {new_source_site} -> {new_target_site}, seeded from "
                + ("the original disks" if seed_ref else "nothing (full copy)"),
                prot.id,
            )
            return prot


def _add_seed(
    s: Session,
    prot: Protection,
    used: RecoveryPoint,
    ref: dict[str, Any],
    vm: VMSpec,
    exact: bool,
) -> None:
    """A `seed` point: the original disks, known exactly after a planned failover (the final
    point's manifest), block by block unknown after an unplanned one (read back and hashed)."""
    cycle = Cycle(
        protection_id=prot.id,
        status="complete",
        phase="done",
        kind="seed",
        snapshot_at=used.created_at,
        finished_at=datetime.now(UTC),
    )
    s.add(cycle)
    s.flush()
    point = RecoveryPoint(
        protection_id=prot.id,
        cycle_id=cycle.id,
        created_at=used.created_at,
        consistency=used.consistency,
        state="seed",
        ref=ref,
        notes="re-protect seed: the original disks",
    )
    s.add(point)
    s.flush()
    used_disks = {d.disk: d for d in used.disks}
    for disk in vm.disks:
        m = Manifest(disk.size)
        src = used_disks.get(disk.name)
        if exact and src is not None:
            m = Manifest.from_blob(src.size, src.manifest)
            m.resize(disk.size)
        else:
            m.invalidate([(0, disk.size)])
        s.add(
            PointDisk(
                point_id=point.id,
                disk=disk.name,
                size=disk.size,
                block_size=65536,
                manifest=m.to_blob(),
                digest=m.digest(),
            )
        )


def failback(engine: Engine, vm_key: str, run_id: int | None = None) -> Failover:
    """A planned failover back to the VM's home site (after re-protect has caught up)."""
    with engine.state.session() as s:
        prot = engine.state.protection(s, vm_key)
        home = prot.home_site
        if home is None or prot.target_site != home:
            raise ConfigError(
                f"VM '{prot.vm_name}' is not re-protected towards its home site; fail over, "
                f"commit and `standby reprotect {prot.vm_name}` first"
            )
        if prot.state == "failed-over" and run_id is not None:
            fo = _active_real(s, prot)
            if fo.run_id == run_id:
                return fo
        if engine._latest_point(s, prot.id) is None:
            raise ConfigError(
                f"re-protect of '{prot.vm_name}' has not caught up: no recovery point at "
                f"'{home}' yet; run `standby replicate {prot.vm_name}`"
            )
    return failover(engine, vm_key, "planned", run_id=run_id)


class EngineActions:
    """What a plan run does to VMs, on the engine (each idempotent per VM and run)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def protected(self, vm: str) -> bool:
        with self.engine.state.session() as s:
            try:
                self.engine.state.protection(s, vm)
            except NotFound:
                return False
        return True

    def failover(
        self, vm: str, kind: str, run_id: int, point_id: int | None = None
    ) -> dict[str, Any]:
        return self._result(failover(self.engine, vm, kind, point_id=point_id, run_id=run_id))

    def cleanup(self, vm: str, run_id: int) -> dict[str, Any]:
        try:
            return {"cleaned": cleanup(self.engine, vm)}
        except NotFound:
            return {"cleaned": []}

    def commit(self, vm: str, run_id: int) -> dict[str, Any]:
        return self._result(commit(self.engine, vm))

    def reprotect(self, vm: str, run_id: int) -> dict[str, Any]:
        p = reprotect(self.engine, vm)
        return {"source": p.source_site, "target": p.target_site, "generation": p.generation}

    def failback(self, vm: str, run_id: int) -> dict[str, Any]:
        return self._result(failback(self.engine, vm, run_id))

    def _result(self, f: Failover) -> dict[str, Any]:
        def iso(t: datetime | None) -> str | None:
            return _aware(t).isoformat() if t else None

        return {
            "failover_id": f.id,
            "kind": f.kind,
            "vm_name": f.vm_name,
            "point_id": f.point_id,
            "point_time": iso(f.point_time),
            "started_at": iso(f.started_at),
            "running_at": iso(f.running_at),
            "addresses": list((f.ref or {}).get("addresses", [])),
            "data_loss_seconds": f.data_loss_seconds,
        }
