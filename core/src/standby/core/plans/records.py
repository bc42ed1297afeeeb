"""Run and step records: detached copies for worker threads, look-ups, and `ack`.

Run states: running | waiting | failed | succeeded | cleaned (a drill whose test VMs were
removed). Step states: pending | running | waiting | succeeded | failed | skipped.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from standby.core.errors import ConfigError, NotFound
from standby.core.state import PlanRun, RunStep, State

from .common import now
from .model import Plan
from .steps import StepSpec

RUN_STATES = ("running", "waiting", "failed", "succeeded", "cleaned")
STEP_STATES = ("pending", "running", "waiting", "succeeded", "failed", "skipped")


@dataclass(frozen=True)
class Step:
    """A detached copy of a `RunStep` row, safe to hand to worker threads."""

    id: int
    seq: int
    key: str
    kind: str
    group_name: str
    vm: str
    spec: dict[str, Any]
    state: str
    result: dict[str, Any]

    @classmethod
    def of(cls, row: RunStep) -> Step:
        return cls(
            row.id,
            row.seq,
            row.key,
            row.kind,
            row.group_name,
            row.vm,
            dict(row.spec or {}),
            row.state,
            dict(row.result or {}),
        )

    @property
    def done(self) -> bool:
        """Finished for the run's purpose: succeeded, skipped, or failed with continue."""
        return self.state in ("succeeded", "skipped") or (
            self.state == "failed" and bool(self.result.get("continued"))
        )

    def spec_view(self) -> StepSpec:
        return StepSpec(self.key, self.kind, self.group_name, self.vm, self.spec)


@dataclass(frozen=True)
class Outcome:
    """How a step ended, for the run loop."""

    key: str
    ok: bool
    continued: bool
    error: str
    exit_code: int


@dataclass(frozen=True)
class RunContext:
    """What every step of a run needs to know about the run."""

    run_id: int
    plan: Plan
    kind: str
    plan_dir: Path
    started_at: datetime


@dataclass
class RunOutcome:
    """Where a run stands when `Runner.run` returns (it raises `StepFailed` on failure)."""

    run_id: int
    plan_name: str
    kind: str
    state: str
    started_at: str | None
    finished_at: str | None
    waiting: dict[str, Any] | None = None
    """The step waiting for an ack: id, key, message."""
    continued: list[str] = field(default_factory=list)
    """Keys of failed steps the plan said to continue past."""
    report: dict[str, Any] | None = None
    report_path: str | None = None


def find_step(s: Session, run_id: int, ref: str) -> RunStep:
    """A step of a run by key or by numeric step id; ConfigError when the run has no such step."""
    stmt = select(RunStep).where(RunStep.run_id == run_id, RunStep.key == ref)
    found = s.scalars(stmt).first()
    if found is None and ref.isdigit():
        row = s.get(RunStep, int(ref))
        found = row if row is not None and row.run_id == run_id else None
    if found is None:
        raise ConfigError(f"run {run_id} has no step '{ref}' (see `standby plan show {run_id}`)")
    return found


def get_run(s: Session, run_id: int) -> PlanRun:
    run = s.get(PlanRun, run_id)
    if run is None:
        raise NotFound(f"no plan run {run_id} (see `standby plan runs`)")
    return run


def steps_of(s: Session, run_id: int) -> list[RunStep]:
    return list(s.scalars(select(RunStep).where(RunStep.run_id == run_id).order_by(RunStep.seq)))


# ----------------------------------------------------------------------------- ack


def ack(state: State, run_id: int, ref: str, user: str | None = None) -> dict[str, Any]:
    """Acknowledge a waiting manual step from any process; the waiting runner continues.

    ConfigError when the step does not exist in the run or is not waiting (acked already,
    not reached yet); NotFound when there is no such run. Needs only the state database.
    """
    who = user or os.environ.get("SUDO_USER") or getpass.getuser()
    at = now()
    with state.session() as s:
        get_run(s, run_id)
        step = find_step(s, run_id, ref)
        if step.state != "waiting":
            by = step.result.get("acked_by") if step.state == "succeeded" else None
            extra = f", acked by {by}" if by else ""
            raise ConfigError(
                f"step {step.key} of run {run_id} is not waiting for an ack ({step.state}{extra})"
            )
        result = {"acked_by": who, "acked_at": at.isoformat()}
        done = cast(
            CursorResult[Any],
            s.execute(
                update(RunStep)
                .where(RunStep.id == step.id, RunStep.state == "waiting")
                .values(state="succeeded", finished_at=at, result=result)
                .execution_options(synchronize_session=False)
            ),
        )
        if done.rowcount != 1:
            raise ConfigError(f"step {step.key} of run {run_id} was acknowledged meanwhile")
        state.log(s, "plan-ack", f"run {run_id}: step {step.key} acknowledged by {who}", run=run_id)
        return {"run": run_id, "step": step.key, "step_id": step.id, **result}
