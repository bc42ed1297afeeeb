"""What a plan run does to VMs, on the lifecycle (each call idempotent per VM and run).

This is the plan runner's `Actions` protocol (`standby.core.plans.runner`), implemented by
structure: the lifecycle does not import the plans, nor the plans the lifecycle.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from standby.core.engine import Engine
from standby.core.errors import NotFound
from standby.core.state import Failover, aware

from .commit import commit
from .failback import failback
from .failover import cleanup, failover
from .reprotect import reprotect


class PlanActions:
    """The plan runner's actions on one engine."""

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
        return _result(failover(self.engine, vm, kind, point_id=point_id, run_id=run_id))

    def cleanup(self, vm: str, run_id: int) -> dict[str, Any]:
        try:
            return {"cleaned": cleanup(self.engine, vm)}
        except NotFound:
            return {"cleaned": []}

    def commit(self, vm: str, run_id: int) -> dict[str, Any]:
        return _result(commit(self.engine, vm))

    def reprotect(self, vm: str, run_id: int) -> dict[str, Any]:
        p = reprotect(self.engine, vm)
        return {"source": p.source_site, "target": p.target_site, "generation": p.generation}

    def failback(self, vm: str, run_id: int) -> dict[str, Any]:
        return _result(failback(self.engine, vm, run_id))


def _iso(t: datetime | None) -> str | None:
    return aware(t).isoformat() if t else None


def _result(f: Failover) -> dict[str, Any]:
    return {
        "failover_id": f.id,
        "kind": f.kind,
        "vm_name": f.vm_name,
        "point_id": f.point_id,
        "point_time": _iso(f.point_time),
        "started_at": _iso(f.started_at),
        "running_at": _iso(f.running_at),
        "addresses": list((f.ref or {}).get("addresses", [])),
        "data_loss_seconds": f.data_loss_seconds,
    }
