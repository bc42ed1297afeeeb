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
import html
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from standby.core.errors import Busy, ConfigError, NotFound, StandbyError
from standby.core.locks import FileLock
from standby.core.plans import (
    VM_STEP_KINDS,
    Plan,
    StepSpec,
    batch_of,
    build_steps,
    check,
    step_summary,
)
from standby.core.state import PlanRun, RunStep, State

RUN_STATES = ("running", "waiting", "failed", "succeeded", "cleaned")
STEP_STATES = ("pending", "running", "waiting", "succeeded", "failed", "skipped")
OUTPUT_LIMIT = 64 * 1024
"""Bytes of a script's combined stdout/stderr kept in `RunStep.output` (the tail)."""


class Actions(Protocol):
    """What a plan run asks of the engine, per VM. Each call is idempotent per (vm, run_id):
    called again for a VM and run it already handled, it returns the earlier result. Calls for
    the VMs of one group come from several threads at once."""

    def protected(self, vm: str) -> bool: ...  # is the VM protected (for check)
    def failover(
        self, vm: str, kind: str, run_id: int, point_id: int | None = None
    ) -> dict[str, Any]: ...
    def cleanup(self, vm: str, run_id: int) -> dict[str, Any]: ...
    def commit(self, vm: str, run_id: int) -> dict[str, Any]: ...
    def reprotect(self, vm: str, run_id: int) -> dict[str, Any]: ...
    def failback(self, vm: str, run_id: int) -> dict[str, Any]: ...


class StepFailed(StandbyError):
    """A run stopped at a failed step; the exit code is the underlying error's."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- small helpers


def now() -> datetime:
    return datetime.now(UTC)


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def iso(dt: datetime | None) -> str | None:
    found = aware(dt)
    return found.isoformat() if found else None


def parse_time(value: object) -> datetime | None:
    """An ISO time from an action's result (naive means UTC), or None."""
    if isinstance(value, datetime):
        return aware(value)
    if not isinstance(value, str) or not value:
        return None
    try:
        return aware(datetime.fromisoformat(value))
    except ValueError:
        return None


def one_line(text: str) -> str:
    return " ".join(text.split())


def seconds_text(value: float | None) -> str:
    """`75.5` -> `1m15.5s`; None -> `-`."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, sec = divmod(value, 60)
    if minutes < 60:
        return f"{minutes:.0f}m{sec:04.1f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours:.0f}h{minutes:02.0f}m{sec:02.0f}s"


def lock_path(home: Path, run_id: int) -> Path:
    return home / "locks" / f"run-{run_id}.lock"


def _jsonable(data: Any) -> dict[str, Any]:
    found = json.loads(json.dumps(data, default=str))
    return found if isinstance(found, dict) else {"value": found}


# ----------------------------------------------------------------------------- shell


@dataclass(frozen=True)
class ShellResult:
    code: int
    output: str
    timed_out: bool


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_tail(buf: IO[bytes], limit: int = OUTPUT_LIMIT) -> str:
    size = buf.seek(0, os.SEEK_END)
    buf.seek(max(0, size - limit))
    text = buf.read().decode(errors="replace")
    return ("[... output truncated ...]\n" + text) if size > limit else text


def run_shell(
    command: str,
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    on_spawn: Callable[[int], None] | None = None,
) -> ShellResult:
    """`/bin/sh -c command` in its own process group; the whole group is killed on timeout.

    stdout and stderr go to one temporary file (never a pipe: a background grandchild cannot
    hold the step open), of which the last OUTPUT_LIMIT bytes are returned.
    """
    with tempfile.TemporaryFile() as buf:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=buf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            if on_spawn is not None:
                on_spawn(proc.pid)
            code = proc.wait(timeout=max(timeout, 0.01))
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            code = proc.wait()
            timed_out = True
        except BaseException:
            _kill_group(proc.pid)
            proc.wait()
            raise
        return ShellResult(code, _read_tail(buf), timed_out)


def _last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return one_line(lines[-1])[:200] if lines else ""


def _ours(pid: int, run_id: int, key: str) -> bool:
    """Whether `pid` is a script this run's step started (its environment says so)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"STANDBY_RUN={run_id}".encode() in environ and (
        f"STANDBY_STEP={key}".encode() in environ
    )


# ----------------------------------------------------------------------------- records


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
class _Done:
    ok: bool
    output: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    exit_code: int = 1


@dataclass(frozen=True)
class _Outcome:
    key: str
    ok: bool
    continued: bool
    error: str
    exit_code: int


@dataclass(frozen=True)
class _Ctx:
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


def _steps(s: Session, run_id: int) -> list[RunStep]:
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


# ----------------------------------------------------------------------------- the runner


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

    def _begin(self, run_id: int, skip: tuple[str, ...]) -> _Ctx | None:
        """Under the run lock: mark skipped steps, make failed steps pending, own the run."""
        with self.state.session() as s:
            run = get_run(s, run_id)
            if run.state in ("succeeded", "cleaned"):
                if skip:
                    raise ConfigError(f"run {run_id} is {run.state}: nothing to skip")
                return None
            for ref in skip:
                self._skip(s, run_id, ref)
            for row in _steps(s, run_id):
                if row.state == "failed" and not (row.result or {}).get("continued"):
                    row.state, row.started_at, row.finished_at = "pending", None, None
            resumed = run.state != "running" or run.pid != os.getpid()
            run.state, run.pid, run.error, run.finished_at = "running", os.getpid(), "", None
            if resumed:
                self.state.log(s, "plan-run", f"run {run_id} resumed", run=run_id)
            return _Ctx(
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

    def _loop(self, ctx: _Ctx, wait: bool) -> RunOutcome:
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
            steps = [Step.of(r) for r in _steps(s, run_id)]
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

    def _execute(self, ctx: _Ctx, batch: list[Step]) -> list[_Outcome]:
        """Run a batch; per-VM steps in parallel. Every step ends in a recorded state."""
        if len(batch) == 1:
            return [self._run_step(ctx, batch[0])]
        workers = min(len(batch), self.max_parallel)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="plan-step") as pool:
            return list(pool.map(lambda st: self._run_step(ctx, st), batch))

    # --------------------------------------------------------------- one step

    def _run_step(self, ctx: _Ctx, step: Step) -> _Outcome:
        self._reap(ctx, step)
        self._mark(step.id, "running")
        self.notify(f"  {step.key}: {step_summary(step.spec_view())}")
        t0 = time.monotonic()
        try:
            done = self._dispatch(ctx, step)
        except StandbyError as exc:
            done = _Done(False, error=one_line(str(exc)), exit_code=exc.exit_code)
        except Exception as exc:  # a bug or an unexpected library error: record it, go on
            done = _Done(False, error=one_line(f"{type(exc).__name__}: {exc}"))
        continued = not done.ok and step.spec.get("on_failure") == "continue"
        self._record(ctx, step, done, continued)
        took = seconds_text(time.monotonic() - t0)
        if done.ok:
            self.notify(f"  {step.key}: succeeded in {took}")
        else:
            note = " (on_failure = continue: the run goes on)" if continued else ""
            self.notify(f"  {step.key}: FAILED after {took}: {done.error}{note}")
        return _Outcome(step.key, done.ok, continued, done.error, done.exit_code)

    def _reap(self, ctx: _Ctx, step: Step) -> None:
        """Kill a script a killed runner left behind for this step before running it again."""
        pid = step.result.get("pid")
        if step.state == "running" and isinstance(pid, int) and _ours(pid, ctx.run_id, step.key):
            _kill_group(pid)

    def _mark(self, step_id: int, state: str) -> None:
        with self.state.session() as s:
            row = s.get(RunStep, step_id)
            assert row is not None
            row.state = state
            row.attempts = (row.attempts or 0) + 1
            if row.started_at is None:
                row.started_at = now()
            row.finished_at = None
            row.result = {}

    def _set_result(self, step_id: int, result: dict[str, Any]) -> None:
        with self.state.session() as s:
            row = s.get(RunStep, step_id)
            assert row is not None
            row.result = result

    def _record(self, ctx: _Ctx, step: Step, done: _Done, continued: bool) -> None:
        result = dict(done.result)
        if not done.ok:
            result["error"] = done.error
            if continued:
                result["continued"] = True
        with self.state.session() as s:
            row = s.get(RunStep, step.id)
            assert row is not None
            row.state = "succeeded" if done.ok else "failed"
            row.finished_at = now()
            row.output = done.output
            row.result = _jsonable(result)
            if not done.ok:
                self.state.log(
                    s,
                    "plan-step",
                    f"run {ctx.run_id}: step {step.key} failed: {done.error}",
                    level="warning" if continued else "error",
                    run=ctx.run_id,
                )

    def _dispatch(self, ctx: _Ctx, step: Step) -> _Done:
        if step.kind == "script":
            return self._script(ctx, step)
        if step.kind == "wait":
            return self._wait(ctx, step)
        if step.kind == "report":
            return self._report_step(ctx)
        if step.kind in VM_STEP_KINDS:
            return self._vm(ctx, step)
        raise ConfigError(f"step {step.key}: unknown step kind '{step.kind}'")

    def _vm(self, ctx: _Ctx, step: Step) -> _Done:
        a, vm, rid = self.actions, step.vm, ctx.run_id
        if step.kind == "failover":
            point = step.spec.get("point")
            result = a.failover(vm, str(step.spec["kind"]), rid, point_id=point)
        elif step.kind == "cleanup":
            result = a.cleanup(vm, rid)
        elif step.kind == "commit":
            result = a.commit(vm, rid)
        elif step.kind == "reprotect":
            result = a.reprotect(vm, rid)
        else:
            result = a.failback(vm, rid)
        return _Done(True, result=_jsonable(result))

    # --------------------------------------------------------------- scripts and checks

    def _vms_of(self, ctx: _Ctx, step: Step) -> list[str]:
        if step.vm:
            return [step.vm]
        for g in ctx.plan.groups:
            if g.name == step.group_name:
                return list(g.vms)
        return ctx.plan.vms()

    def address(self, run_id: int, vm: str) -> str | None:
        """The first address the VM's failover (or failback) step of this run reported."""
        with self.state.session() as s:
            stmt = select(RunStep).where(
                RunStep.run_id == run_id,
                RunStep.vm == vm,
                RunStep.kind.in_(("failover", "failback")),
                RunStep.state == "succeeded",
            )
            row = s.scalars(stmt).first()
            addresses = (row.result or {}).get("addresses") if row else None
        if isinstance(addresses, list) and addresses:
            return str(addresses[0])
        return None

    def _env(self, ctx: _Ctx, step: Step) -> dict[str, str]:
        vms = self._vms_of(ctx, step)
        env = {
            **os.environ,
            "STANDBY_PLAN": ctx.plan.name,
            "STANDBY_RUN": str(ctx.run_id),
            "STANDBY_STEP": step.key,
            "STANDBY_GROUP": step.group_name,
            "STANDBY_VM": ",".join(vms),
            "STANDBY_KIND": ctx.kind,
        }
        env.pop("STANDBY_VM_ADDRESS", None)
        addresses = [self.address(ctx.run_id, vm) for vm in vms]
        if vms and all(addresses):
            env["STANDBY_VM_ADDRESS"] = ",".join(a for a in addresses if a)
        return env

    def _cwd(self, ctx: _Ctx) -> Path:
        if not ctx.plan_dir.is_dir():
            raise ConfigError(f"the plan's folder {ctx.plan_dir} is gone (scripts run there)")
        return ctx.plan_dir

    def _script(self, ctx: _Ctx, step: Step) -> _Done:
        command, timeout = str(step.spec["command"]), float(step.spec["timeout"])
        t0 = time.monotonic()
        res = run_shell(
            command,
            self._cwd(ctx),
            self._env(ctx, step),
            timeout,
            on_spawn=lambda pid: self._set_result(step.id, {"pid": pid}),
        )
        result = {"exit_code": res.code, "seconds": round(time.monotonic() - t0, 3)}
        if res.timed_out:
            error = f"script `{command}` timed out after {seconds_text(timeout)}; killed"
            return _Done(False, res.output, {**result, "timed_out": True}, error)
        if res.code != 0:
            last = _last_line(res.output)
            error = f"script `{command}` exited with {res.code}" + (f": {last}" if last else "")
            return _Done(False, res.output, result, error)
        return _Done(True, res.output, result)

    def _wait(self, ctx: _Ctx, step: Step) -> _Done:
        spec = step.spec
        timeout, interval = float(spec["timeout"]), float(spec["interval"])
        who = step.vm or step.group_name or "plan"
        if spec.get("tcp") is not None:
            host = spec.get("host") or (self.address(ctx.run_id, step.vm) if step.vm else None)
            if not host:
                raise ConfigError(
                    f"{who}: no address is known for the health check (its failover reported "
                    "none); give host = ... in the plan"
                )
            target = f"tcp {host}:{spec['tcp']}"
            probe: Callable[[float], tuple[bool, str]] = lambda left: _tcp_probe(  # noqa: E731
                str(host), int(spec["tcp"]), min(interval, left, 10.0)
            )
        else:
            target = f"`{spec['command']}`"
            cwd, env = self._cwd(ctx), self._env(ctx, step)
            probe = lambda left: _command_probe(str(spec["command"]), cwd, env, left)  # noqa: E731
        return _poll(probe, who, target, timeout, interval)

    # --------------------------------------------------------------- manual steps

    def _manual(self, ctx: _Ctx, step: Step, wait: bool) -> bool:
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

    def _fail(self, ctx: _Ctx, failed: list[_Outcome]) -> None:
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

    def _complete(self, ctx: _Ctx) -> RunOutcome:
        with self.state.session() as s:
            run = get_run(s, ctx.run_id)
            cleaned = ctx.kind == "drill" and any(r.kind == "cleanup" for r in _steps(s, run.id))
            run.state, run.finished_at = ("cleaned" if cleaned else "succeeded"), now()
            self.state.log(s, "plan-run", f"run {ctx.run_id} {run.state}", run=ctx.run_id)
        return self.outcome(ctx.run_id)

    def outcome(self, run_id: int) -> RunOutcome:
        """Where a run stands, from the database."""
        with self.state.session() as s:
            run = get_run(s, run_id)
            steps = _steps(s, run_id)
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

    def _report_step(self, ctx: _Ctx) -> _Done:
        paths = self._write_report(ctx.run_id)
        return _Done(True, result={"json": str(paths[0]), "html": str(paths[1])})

    def _write_report(self, run_id: int) -> tuple[Path, Path]:
        with self.state.session() as s:
            run = get_run(s, run_id)
            report = build_report(run, _steps(s, run_id))
            run.report = report
        return write_report(self.home, report)


# ----------------------------------------------------------------------------- probes


def _tcp_probe(host: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        with socket.create_connection((host, port), timeout=max(timeout, 0.1)):
            return True, f"tcp {host}:{port} open"
    except OSError as exc:
        return False, one_line(str(exc)) or type(exc).__name__


def _command_probe(command: str, cwd: Path, env: dict[str, str], left: float) -> tuple[bool, str]:
    res = run_shell(command, cwd, env, max(left, 0.1))
    if res.timed_out:
        return False, "timed out"
    last = _last_line(res.output)
    return res.code == 0, f"exit {res.code}" + (f": {last}" if last else "")


def _poll(
    probe: Callable[[float], tuple[bool, str]],
    who: str,
    target: str,
    timeout: float,
    interval: float,
) -> _Done:
    """Probe every `interval` until it passes or `timeout` is over."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    attempts = 0
    while True:
        attempts += 1
        ok, detail = probe(max(deadline - time.monotonic(), 0.1))
        if ok:
            seconds = round(time.monotonic() - t0, 3)
            return _Done(True, detail, {"target": target, "attempts": attempts, "seconds": seconds})
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(interval, left))
    error = f"{who}: health check {target} did not pass within {seconds_text(timeout)} ({detail})"
    return _Done(False, detail, {"target": target, "attempts": attempts}, error)


# ----------------------------------------------------------------------------- views


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
        view["steps"] = [step_row(r) for r in _steps(s, run_id)]
        if run.report:
            view["report"] = str(home / "reports" / f"drill-{run_id}.html")
        return view


def list_runs(state: State, home: Path, limit: int = 50) -> list[dict[str, Any]]:
    """The newest runs, oldest first."""
    with state.session() as s:
        rows = s.scalars(select(PlanRun).order_by(PlanRun.id.desc()).limit(limit)).all()
        return [run_row(r, home) for r in reversed(rows)]


# ----------------------------------------------------------------------------- drill report


def _delta(a: datetime | None, b: datetime | None) -> float | None:
    return round((a - b).total_seconds(), 3) if a is not None and b is not None else None


def _vm_figures(vm: str, group: str, mine: list[RunStep], start: datetime) -> dict[str, Any]:
    """One VM's figures, from its recorded steps (see `build_report`)."""
    fo = next((r for r in mine if r.kind == "failover"), None)
    res: dict[str, Any] = dict(fo.result or {}) if fo is not None else {}
    ok = fo is not None and fo.state == "succeeded"
    point_time = parse_time(res.get("point_time")) if ok else None
    fo_start = (parse_time(res.get("started_at")) or aware(fo.started_at)) if ok and fo else None
    running = parse_time(res.get("running_at")) if ok else None
    waits = [r for r in mine if r.kind == "wait"]
    healthy_at = None
    if waits and all(r.state == "succeeded" and r.finished_at for r in waits):
        healthy_at = aware(max(r.finished_at for r in waits if r.finished_at))
    to_running = _delta(running, start)
    to_healthy = _delta(healthy_at, start)
    return {
        "vm": vm,
        "group": group,
        "failover_state": fo.state if fo is not None else "missing",
        "failover_id": res.get("failover_id") if ok else None,
        "target_vm": res.get("vm_name") if ok else None,
        "addresses": res.get("addresses", []) if ok else [],
        "point_id": res.get("point_id") if ok else None,
        "point_time": iso(point_time),
        "failover_started_at": iso(fo_start),
        "running_at": iso(running),
        "rpo_seconds": _delta(fo_start, point_time),
        "data_loss_seconds": res.get("data_loss_seconds") if ok else None,
        "time_to_running_seconds": to_running,
        "health_checks": len(waits),
        "healthy": (to_healthy is not None) if waits else None,
        "time_to_healthy_seconds": to_healthy,
        "recovered_seconds": to_healthy if waits else to_running,
        "steps": [step_row(r, tail=1024) for r in mine],
    }


def build_report(run: PlanRun, steps: list[RunStep]) -> dict[str, Any]:
    """The drill report, computed only from the run's recorded steps.

    Per VM: the point used and its source time; achieved RPO = the failover's start - the
    point's time; time to running = the failover's `running_at` - the run's start; time to
    healthy = the finish of the VM's last health check - the run's start (null without
    checks, or when a check did not pass). Plan RTO = the largest time to healthy (time to
    running for VMs without checks) over all VMs; null if some VM did not get there.
    """
    start = aware(run.started_at) or now()
    plan = Plan.from_snapshot(run.plan)
    vms = [
        _vm_figures(vm, g.name, [r for r in steps if r.vm == vm], start)
        for g in plan.groups
        for vm in g.vms
    ]
    recovered = [v["recovered_seconds"] for v in vms]
    rto = max(recovered) if recovered and all(x is not None for x in recovered) else None
    problems = [f"{r.key}: {(r.result or {}).get('error')}" for r in steps if r.state == "failed"]
    return {
        "run": run.id,
        "plan": run.plan_name,
        "description": plan.description,
        "plan_path": run.plan_path,
        "kind": run.kind,
        "state": "failed" if run.state == "failed" else "succeeded",
        "started_at": iso(start),
        "generated_at": now().isoformat(),
        "rto_seconds": rto,
        "vm_count": len(vms),
        "vms": vms,
        "plan_steps": [step_row(r, tail=1024) for r in steps if not r.vm],
        "problems": problems,
    }


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_report(home: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """`reports/drill-<run>.json` and `.html` under the home; returns both paths."""
    directory = home / "reports"
    directory.mkdir(parents=True, exist_ok=True)
    base = directory / f"drill-{report['run']}"
    json_path, html_path = base.with_suffix(".json"), base.with_suffix(".html")
    _atomic_write(json_path, json.dumps(report, indent=2, default=str) + "\n")
    _atomic_write(html_path, render_html(report))
    return json_path, html_path


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}
.succeeded,.cleaned{color:#17692a}.failed{color:#b00020}.skipped,.pending{color:#777}
code,pre{font-family:ui-monospace,monospace;font-size:90%;white-space:pre-wrap}
"""


def _e(value: object) -> str:
    return html.escape("-" if value is None else str(value))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """`rows` hold already-escaped cells."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _state_cell(state: object) -> str:
    return f'<span class="{_e(state)}">{_e(state)}</span>'


def _step_rows(steps: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for st in steps:
        result = {k: v for k, v in st["result"].items() if k != "error"}
        detail = _e(st["error"]) if st["error"] else f"<code>{_e(json.dumps(result))}</code>"
        rows.append(
            [
                _e(st["key"]),
                _e(st["kind"]),
                _e(st["vm"] or st["group"]),
                _state_cell(st["state"]),
                _e(st["started_at"]),
                _e(seconds_text(st["duration_seconds"])),
                detail,
            ]
        )
    return rows


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page (inline CSS, no scripts); every value is escaped."""
    summary = _table(
        ["plan", "description", "run", "state", "started", "RTO (plan)", "VMs"],
        [
            [
                _e(report["plan"]),
                _e(report["description"]),
                _e(report["run"]),
                _state_cell(report["state"]),
                _e(report["started_at"]),
                _e(seconds_text(report["rto_seconds"])),
                _e(report["vm_count"]),
            ]
        ],
    )
    vm_rows = [
        [
            _e(v["vm"]),
            _e(v["group"]),
            _state_cell(v["failover_state"]),
            _e(v["point_id"]),
            _e(v["point_time"]),
            _e(seconds_text(v["rpo_seconds"])),
            _e(seconds_text(v["time_to_running_seconds"])),
            _e(seconds_text(v["time_to_healthy_seconds"])),
            _e(v["target_vm"]),
            _e(", ".join(str(a) for a in v["addresses"])),
        ]
        for v in report["vms"]
    ]
    vms = _table(
        [
            "VM",
            "group",
            "failover",
            "point",
            "point time (source)",
            "RPO achieved",
            "to running",
            "to healthy",
            "test VM",
            "addresses",
        ],
        vm_rows,
    )
    step_headers = ["step", "kind", "VM / group", "state", "started", "took", "result"]
    steps = [_table(step_headers, _step_rows(report["plan_steps"]))]
    steps += [
        f"<h3>{_e(v['vm'])}</h3>" + _table(step_headers, _step_rows(v["steps"]))
        for v in report["vms"]
    ]
    problems = "".join(f"<li>{_e(p)}</li>" for p in report["problems"])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Drill report: {_e(report['plan'])} (run {_e(report['run'])})</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>Drill report: {_e(report['plan'])} (run {_e(report['run'])})</h1>"
        f"<p>Generated {_e(report['generated_at'])} from the run's recorded steps.</p>"
        f"{summary}<h2>Virtual machines</h2>{vms}"
        + (f"<h2>Problems</h2><ul>{problems}</ul>" if problems else "")
        + "<h2>Steps</h2>"
        + "".join(steps)
        + "</body></html>\n"
    )
