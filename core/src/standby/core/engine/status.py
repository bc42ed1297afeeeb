"""RPO and health per protection (`standby status`), and what `--watch` should run next."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from standby.core.config import Policy
from standby.core.locks import FileLock, vm_lock_path
from standby.core.state import Cycle, Protection, State, aware


def _health(
    prot: Protection, rpo: float | None, target: int, last: Cycle | None, home: Path | None
) -> tuple[str, str]:
    """ok | initial-sync-pending | rpo-breached | replicating | resumable, or the stored one."""
    health, reason = prot.health, prot.health_reason
    if health != "ok":
        return health, reason
    if rpo is None:
        health, reason = "initial-sync-pending", "no recovery point yet"
    elif rpo > target:
        health, reason = "rpo-breached", f"latest point is {int(rpo)}s old"
    if last is not None and last.status == "running":
        alive = home is None or FileLock.held(vm_lock_path(home, prot.vm_name))
        if last.error or not alive:
            return "resumable", last.error or "a cycle was interrupted; replicate resumes it"
        return "replicating", f"cycle {last.id} in progress"
    return health, reason


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
            rpo = (now - aware(latest.created_at)).total_seconds() if latest else None
            last = s.scalars(
                select(Cycle).where(Cycle.protection_id == prot.id).order_by(Cycle.id.desc())
            ).first()
            health, reason = _health(prot, rpo, policy.rpo_seconds, last, home)
            rows.append(
                {
                    "vm": prot.vm_name,
                    "source": prot.source_site,
                    "target": prot.target_site,
                    "state": prot.state,
                    "replication": policy.replication,
                    "points": len(visible),
                    "latest_point": latest.id if latest else None,
                    "latest_point_time": aware(latest.created_at).isoformat() if latest else None,
                    "rpo_seconds": round(rpo, 1) if rpo is not None else None,
                    "rpo_target_seconds": policy.rpo_seconds,
                    "health": health,
                    "reason": reason,
                    "last_cycle": _cycle_row(last),
                }
            )
    return rows


def _cycle_row(c: Cycle | None) -> dict[str, Any] | None:
    if c is None:
        return None
    return {
        "id": c.id,
        "status": c.status,
        "kind": c.kind,
        "bytes_written": c.bytes_written,
        "error": c.error,
    }


def due(state: State, home: Path | None = None) -> list[str]:
    """Protections whose latest point is older than half their RPO target (for --watch)."""
    out = []
    for row in status_rows(state, home):
        if row["state"] != "protected" or row["health"] == "source-missing":
            continue
        if row["rpo_seconds"] is None or row["rpo_seconds"] >= row["rpo_target_seconds"] / 2:
            out.append(str(row["vm"]))
    return out
