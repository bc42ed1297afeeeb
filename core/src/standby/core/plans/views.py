"""Runs and steps as JSON, for `plan show`, `plan runs` and the drill report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select

from standby.core.locks import FileLock
from standby.core.state import PlanRun, RunStep, State

from .common import aware, iso, lock_path
from .records import get_run, steps_of


def step_row(row: RunStep, tail: int = 4096) -> dict[str, Any]:
    """A step as JSON: times, duration, attempts, result, error and the output's tail."""
    started, finished = aware(row.started_at), aware(row.finished_at)
    result = dict(row.result or {})
    return {
        "id": row.id,
        "seq": row.seq,
        "key": row.key,
        "kind": row.kind,
        "group": row.group_name,
        "vm": row.vm,
        "state": row.state,
        "started_at": iso(started),
        "finished_at": iso(finished),
        "duration_seconds": (
            round((finished - started).total_seconds(), 3) if started and finished else None
        ),
        "attempts": row.attempts,
        "error": result.get("error"),
        "result": result,
        "output_tail": (row.output or "")[-tail:],
    }


def run_row(run: PlanRun, home: Path) -> dict[str, Any]:
    started, finished = aware(run.started_at), aware(run.finished_at)
    active = FileLock.held(lock_path(home, run.id))
    return {
        "id": run.id,
        "plan": run.plan_name,
        "plan_path": run.plan_path,
        "kind": run.kind,
        "state": run.state,
        "active": active,
        "interrupted": run.state == "running" and not active,
        "started_at": iso(started),
        "finished_at": iso(finished),
        "duration_seconds": (
            round((finished - started).total_seconds(), 3) if started and finished else None
        ),
        "error": run.error,
        "pid": run.pid,
    }


def run_view(state: State, home: Path, run_id: int) -> dict[str, Any]:
    """One run with all its steps (for `plan show RUN`)."""
    with state.session() as s:
        run = get_run(s, run_id)
        view = run_row(run, home)
        view["steps"] = [step_row(r) for r in steps_of(s, run_id)]
        if run.report:
            view["report"] = str(home / "reports" / f"drill-{run_id}.html")
        return view


def list_runs(state: State, home: Path, limit: int = 50) -> list[dict[str, Any]]:
    """The newest runs, oldest first."""
    with state.session() as s:
        rows = s.scalars(select(PlanRun).order_by(PlanRun.id.desc()).limit(limit)).all()
        return [run_row(r, home) for r in reversed(rows)]
