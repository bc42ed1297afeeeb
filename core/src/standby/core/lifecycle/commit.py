"""Commit: a real failover is final; the other points can no longer be chosen."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session

from standby.core.engine import Engine
from standby.core.errors import ConfigError
from standby.core.state import (
    Failover,
    Protection,
    RecoveryPoint,
    failovers,
    point_info,
    protection_info,
)


def active_real(s: Session, prot: Protection) -> Failover:
    """The running real (planned or unplanned) failover of a protection."""
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
                return active_real(s, prot)  # already done (idempotent for resumed runs)
            if prot.state != "failed-over":
                raise ConfigError(f"VM '{prot.vm_name}' has not failed over; nothing to commit")
            fo = active_real(s, prot)
            used = s.get(RecoveryPoint, fo.point_id)
            assert used is not None
            others = [p for p in prot.points if p.state == "visible" and p.id != used.id]
            pinfo, keep, ref = protection_info(prot), point_info(used), dict(fo.ref)
            drop = [point_info(p) for p in others]
        engine.target(pinfo.target_site).commit_failover(pinfo, ref, keep, drop)
        with engine.state.session() as s:
            prot = engine.state.protection(s, vm_key)
            released = {d.id for d in drop}
            for p in prot.points:
                if p.id in released:
                    p.state = "released"
            fo = active_real(s, prot)
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
