"""Durable plan runs: the persisted step state machine, the step executors, drill reports.

A run is a `PlanRun` row and its `RunStep` rows, built once at start (`Runner.start`) from the
plan. `Runner.run` executes the first unfinished step (or parallel batch of per-VM steps),
committing every step transition before and after the action, so a runner killed at any
moment is continued by `Runner.run` in another process: finished steps are never repeated and
a step found `running` is executed again (VM actions are idempotent per VM and run; scripts
should be). One runner per run at a time: `locks/run-<id>.lock`.

Run states: running | waiting | failed | succeeded | cleaned (a drill whose test VMs were
removed). Step states: pending | running | waiting | succeeded | failed | skipped.
"""

from __future__ import annotations

import getpass
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.core.errors import Busy, ConfigError, StandbyError
from standby.core.locks import FileLock
from standby.core.state import PlanRun, RunStep, State

from .check import check
from .common import aware, iso, lock_path, now
from .executor import Actions, StepExecutor
from .model import Plan
from .records import Outcome, RunContext, RunOutcome, Step, find_step, get_run, steps_of
from .report import build_report, write_report
from .steps import batch_of, build_steps


class StepFailed(StandbyError):
    """A run stopped at a failed step; the exit code is the underlying error's."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Runner:
    """Starts plan runs and drives them to the end, durably (see the module docstring)."""

    def __init__(
        self,
        state: State,
        home: Path,
        actions: Actions,
        *,
        poll: float = 0.5,
        notify: Callable[[str], None] | None = None,
        max_parallel: int = 16,
    ) -> None:
        self.state = state
        self.home = home
        self.actions = actions
        self.poll = poll
        self.notify = notify or (lambda _line: None)
        self.max_parallel = max_parallel
        self.executor = StepExecutor(state, actions, self.notify, self._write_report)

    # --------------------------------------------------------------- start

    def start(self, plan: Plan, path: Path, kind: str, keep: bool = False) -> int:
        """Check the plan, refuse if a run of it is active, and record the run and its steps.

        Nothing is executed; `run` does that. Returns the run id.
        """
        problems = check(plan, self.actions.protected)
        if problems:
            raise ConfigError(f"{path}: " + "; ".join(problems))
        steps = build_steps(plan, kind, keep)
        with self.state.session() as s:
            self._refuse_concurrent(s, plan.name)
            run = PlanRun(
                plan_name=plan.name,
                plan_path=str(path.resolve()),
                plan=plan.snapshot(),
                kind=kind,
                state="running",
                started_at=now(),
                pid=os.getpid(),
                error="",
                report={},
            )
            s.add(run)
            s.flush()
            for seq, st in enumerate(steps):
                s.add(
                    RunStep(
                        run_id=run.id,
                        seq=seq,
                        key=st.key,
                        kind=st.kind,
                        group_name=st.group_name,
                        vm=st.vm,
                        spec=st.spec,
                        state="pending",
                        attempts=0,
                        output="",
                        result={},
                    )
                )
            self.state.log(
                s, "plan-run", f"plan {plan.name}: {kind} run {run.id} started", run=run.id
            )
            return run.id

    def _refuse_concurrent(self, s: Session, name: str) -> None:
        stmt = select(PlanRun).where(
            PlanRun.plan_name == name, PlanRun.state.in_(("running", "waiting"))
        )
        for other in s.scalars(stmt):
            if FileLock.held(lock_path(self.home, other.id)):
                raise Busy(f"plan '{name}' has an active {other.kind} run {other.id}; wait for it")

    # --------------------------------------------------------------- run

    def run(self, run_id: int, *, wait: bool = True, skip: Iterable[str] = ()) -> RunOutcome:
        """Execute a run's unfinished steps in order (a fresh run, or a resume).

        Returns when the run finished or, with `wait=False`, when it reached a manual step;
        raises `StepFailed` when a step failed (the run is then `failed` and resumable: the
        failed steps run again, or `skip` names steps to mark skipped first), `Busy` when
        another process drives the run.
        """
        with ExitStack() as stack:
            try:
                stack.enter_context(FileLock(lock_path(self.home, run_id), f"plan run {run_id}"))
            except Busy:
                holder = lock_path(self.home, run_id).read_text().strip() or "?"
                raise Busy(
                    f"plan run {run_id} is being run by another process (pid {holder})"
                ) from None
            ctx = self._begin(run_id, tuple(skip))
            if ctx is None:
                return self.outcome(run_id)
            return self._loop(ctx, wait)

    def _begin(self, run_id: int, skip: tuple[str, ...]) -> RunContext | None:
        """Under the run lock: mark skipped steps, make failed steps pending, own the run."""
        with self.state.session() as s:
            run = get_run(s, run_id)
            if run.state in ("succeeded", "cleaned"):
                if skip:
                    raise ConfigError(f"run {run_id} is {run.state}: nothing to skip")
                return None
            for ref in skip:
                self._skip(s, run_id, ref)
            for row in steps_of(s, run_id):
                if row.state == "failed" and not (row.result or {}).get("continued"):
                    row.state, row.started_at, row.finished_at = "pending", None, None
            resumed = run.state != "running" or run.pid != os.getpid()
            run.state, run.pid, run.error, run.finished_at = "running", os.getpid(), "", None
            if resumed:
                self.state.log(s, "plan-run", f"run {run_id} resumed", run=run_id)
            return RunContext(
                run_id=run.id,
                plan=Plan.from_snapshot(run.plan),
                kind=run.kind,
                plan_dir=Path(run.plan_path).parent,
                started_at=aware(run.started_at) or now(),
            )

    def _skip(self, s: Session, run_id: int, ref: str) -> None:
        row = find_step(s, run_id, ref)
        if row.state not in ("failed", "waiting", "pending"):
            raise ConfigError(f"step {row.key} of run {run_id} is {row.state}: cannot skip it")
        who = os.environ.get("SUDO_USER") or getpass.getuser()
        row.state, row.finished_at = "skipped", now()
        row.result = {**(row.result or {}), "skipped_by": who, "skipped_at": now().isoformat()}
        self.state.log(s, "plan-step", f"run {run_id}: step {row.key} skipped by {who}")

    def _loop(self, ctx: RunContext, wait: bool) -> RunOutcome:
        while True:
            batch = self._next_batch(ctx.run_id)
            if not batch:
                return self._complete(ctx)
            if batch[0].kind == "manual":
                if not self._manual(ctx, batch[0], wait):
                    return self.outcome(ctx.run_id)
                continue
            outcomes = self._execute(ctx, batch)
            failed = [o for o in outcomes if not o.ok and not o.continued]
            if failed:
                self._fail(ctx, failed)

    def _next_batch(self, run_id: int) -> list[Step]:
        """The first unfinished step, with the unfinished steps of its parallel batch."""
        with self.state.session() as s:
            steps = [Step.of(r) for r in steps_of(s, run_id)]
        todo = [i for i, st in enumerate(steps) if not st.done]
        if not todo:
            return []
        first = steps[todo[0]]
        batch = [first]
        if not first.vm:
            return batch
        bid = batch_of(first.key, first.vm)
        for st in steps[todo[0] + 1 :]:
            if not st.vm or batch_of(st.key, st.vm) != bid:
                break
            if not st.done:
                batch.append(st)
        return batch

    def _execute(self, ctx: RunContext, batch: list[Step]) -> list[Outcome]:
        """Run a batch; per-VM steps in parallel. Every step ends in a recorded state."""
        if len(batch) == 1:
            return [self.executor.run_step(ctx, batch[0])]
        workers = min(len(batch), self.max_parallel)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="plan-step") as pool:
            return list(pool.map(lambda st: self.executor.run_step(ctx, st), batch))

    # --------------------------------------------------------------- manual steps

    def _manual(self, ctx: RunContext, step: Step, wait: bool) -> bool:
        """Mark a manual step waiting and, with `wait`, poll until someone acknowledges it."""
        message = str(step.spec.get("message", ""))
        if step.state != "waiting":
            with self.state.session() as s:
                row = s.get(RunStep, step.id)
                run = s.get(PlanRun, ctx.run_id)
                assert row is not None and run is not None
                row.state, row.attempts = "waiting", (row.attempts or 0) + 1
                row.started_at = row.started_at or now()
                run.state = "waiting"
                self.state.log(
                    s,
                    "plan-step",
                    f"run {ctx.run_id}: step {step.key} waits for an ack: {message}",
                    run=ctx.run_id,
                )
        else:
            self._set_run_state(ctx.run_id, "waiting")
        self.notify(
            f"  {step.key}: WAITING: {message}\n"
            f"  acknowledge with `standby plan ack {ctx.run_id} {step.key}`"
        )
        if not wait:
            return False
        while True:
            with self.state.session() as s:
                row = s.get(RunStep, step.id)
                assert row is not None
                current = row.state
            if current != "waiting":
                self._set_run_state(ctx.run_id, "running")
                if current == "succeeded":
                    self.notify(f"  {step.key}: acknowledged")
                return True
            time.sleep(self.poll)

    def _set_run_state(self, run_id: int, state: str) -> None:
        with self.state.session() as s:
            run = s.get(PlanRun, run_id)
            assert run is not None
            run.state = state

    # --------------------------------------------------------------- the end

    def _fail(self, ctx: RunContext, failed: list[Outcome]) -> None:
        first = failed[0]
        more = f" (and {len(failed) - 1} more steps of its batch)" if len(failed) > 1 else ""
        error = f"step {first.key} failed: {first.error}{more}"
        with self.state.session() as s:
            run = get_run(s, ctx.run_id)
            run.state, run.error, run.finished_at = "failed", error, now()
            self.state.log(s, "plan-run", f"run {ctx.run_id} failed: {error}", level="error")
        if ctx.kind == "drill":
            try:
                self._write_report(ctx.run_id)
            except (OSError, StandbyError) as exc:
                self.notify(f"  the drill report could not be written: {exc}")
        raise StepFailed(
            f"plan {ctx.plan.name}: {ctx.kind} run {ctx.run_id}: {error}; fix the cause, then "
            f"`standby plan resume {ctx.run_id}`",
            first.exit_code,
        )

    def _complete(self, ctx: RunContext) -> RunOutcome:
        with self.state.session() as s:
            run = get_run(s, ctx.run_id)
            cleaned = ctx.kind == "drill" and any(r.kind == "cleanup" for r in steps_of(s, run.id))
            run.state, run.finished_at = ("cleaned" if cleaned else "succeeded"), now()
            self.state.log(s, "plan-run", f"run {ctx.run_id} {run.state}", run=ctx.run_id)
        return self.outcome(ctx.run_id)

    def outcome(self, run_id: int) -> RunOutcome:
        """Where a run stands, from the database."""
        with self.state.session() as s:
            run = get_run(s, run_id)
            steps = steps_of(s, run_id)
            waiting = next((r for r in steps if r.state == "waiting"), None)
            report_path = self.home / "reports" / f"drill-{run_id}.html"
            return RunOutcome(
                run_id=run.id,
                plan_name=run.plan_name,
                kind=run.kind,
                state=run.state,
                started_at=iso(run.started_at),
                finished_at=iso(run.finished_at),
                waiting=(
                    {
                        "id": waiting.id,
                        "key": waiting.key,
                        "message": (waiting.spec or {}).get("message", ""),
                    }
                    if waiting
                    else None
                ),
                continued=[
                    r.key
                    for r in steps
                    if r.state == "failed" and (r.result or {}).get("continued")
                ],
                report=dict(run.report) if run.report else None,
                report_path=str(report_path) if run.report else None,
            )

    # --------------------------------------------------------------- drill report

    def _write_report(self, run_id: int) -> tuple[Path, Path]:
        with self.state.session() as s:
            run = get_run(s, run_id)
            report = build_report(run, steps_of(s, run_id))
            run.report = report
        return write_report(self.home, report)
