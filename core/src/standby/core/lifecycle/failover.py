"""Failover: start a VM at the target from a recovery point (test, planned, unplanned).

Every failover is a `Failover` row written before the target is touched, so a killed run
leaves a record that `failover cleanup` or a resumed plan run finds.
"""

from __future__ import annotations

from contextlib import suppress
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.core.config import Policy
from standby.core.engine import Engine
from standby.core.errors import ConfigError, NotFound, StandbyError
from standby.core.model import FailoverResult, PointInfo, ProtectionInfo
from standby.core.state import (
    ACTIVE,
    UNCLEANED,
    Failover,
    Protection,
    RecoveryPoint,
    aware,
    failovers,
    latest_point,
    point_info,
    protection_info,
)

from .planned import final_cycle

KINDS = ("test", "planned", "unplanned")


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
            if run_id is not None:
                done = _earlier_attempt(engine, s, prot, kind, run_id)
                if done is not None:
                    return done
            _check_can_fail_over(s, prot, kind)
            policy = Policy.model_validate(prot.policy)
            name = prot.vm_name
        if kind == "planned":
            point_id = final_cycle(engine, name, policy)
        fo_id, pinfo, point, size = _record_start(engine, vm_key, kind, point_id, run_id)
        result = _start_at_target(engine, fo_id, pinfo, point, kind, network, size)
        return _record_running(engine, fo_id, pinfo, kind, result)


def _earlier_attempt(
    engine: Engine, s: Session, prot: Protection, kind: str, run_id: int
) -> Failover | None:
    """A resumed plan run never starts the same failover twice: a running one is returned,
    one killed part-way is cleaned up so that it can start again."""
    again = s.scalars(
        select(Failover).where(
            Failover.protection_id == prot.id,
            Failover.run_id == run_id,
            Failover.kind == kind,
            Failover.state.in_(ACTIVE),
        )
    ).first()
    if again is None:
        return None
    if again.state == "running":
        return again
    again.state = "failed"
    again.error = "interrupted; started again by the resumed run"
    leftover = {"failover_id": again.id, "kind": kind, **dict(again.ref or {})}
    engine.target(prot.target_site).cleanup_test(protection_info(prot), leftover)
    again.state = "cleaned"
    return None


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


def choose_point(s: Session, prot: Protection, point_id: int | None) -> RecoveryPoint:
    """The given visible point of the protection, or its latest one."""
    if point_id is None:
        point = latest_point(s, prot.id)
        if point is None:
            raise NotFound(f"VM '{prot.vm_name}' has no recovery point yet")
        return point
    point = s.get(RecoveryPoint, point_id)
    if point is None or point.protection_id != prot.id or point.state != "visible":
        raise NotFound(f"recovery point {point_id} does not exist for VM '{prot.vm_name}'")
    return point


def _record_start(
    engine: Engine, vm_key: str, kind: str, point_id: int | None, run_id: int | None
) -> tuple[int, ProtectionInfo, PointInfo, str | None]:
    """The `Failover` row (with the data-loss window), before the target is touched."""
    with engine.state.session() as s:
        prot = engine.state.protection(s, vm_key)
        point = choose_point(s, prot, point_id)
        now = datetime.now(UTC)
        fo = Failover(
            protection_id=prot.id,
            point_id=point.id,
            kind=kind,
            run_id=run_id,
            point_time=point.created_at,
            data_loss_seconds=(
                0.0 if kind == "planned" else (now - aware(point.created_at)).total_seconds()
            ),
        )
        s.add(fo)
        s.flush()
        loss = (
            ""
            if kind != "unplanned"
            else f"; data-loss window {fo.data_loss_seconds:.0f}s (point taken "
            f"{aware(point.created_at).isoformat(timespec='seconds')})"
        )
        engine.state.log(
            s,
            "failover",
            f"{kind} failover of {prot.vm_name} from point {point.id} started{loss}",
            prot.id,
        )
        return fo.id, protection_info(prot), point_info(point), prot.target_size


def _start_at_target(
    engine: Engine,
    fo_id: int,
    pinfo: ProtectionInfo,
    point: PointInfo,
    kind: str,
    network: str | None,
    size: str | None,
) -> FailoverResult:
    """The target's failover; on any failure the row says so and what it made is removed."""
    target = engine.target(pinfo.target_site)
    target.on_step = engine.step_reporter(pinfo.id, fo_id)
    try:
        return target.failover(
            pinfo, point, test=kind == "test", network=network, size=size, failover_id=fo_id
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


def _record_running(
    engine: Engine, fo_id: int, pinfo: ProtectionInfo, kind: str, result: FailoverResult
) -> Failover:
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
            target.on_step = engine.step_reporter(pinfo.id, fo_id)
            target.cleanup_test(pinfo, ref)
            engine.progress.finish()
            with engine.state.session() as s:
                f = s.get(Failover, fo_id)
                assert f is not None
                f.state = "cleaned"
                f.finished_at = datetime.now(UTC)
                engine.state.log(s, "cleanup", f"{f.kind} failover {fo_id} cleaned up", pinfo.id)
        return [w[0] for w in work]
