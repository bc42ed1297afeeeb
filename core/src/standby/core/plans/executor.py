"""One step of a run: mark it running, execute it (VM action, script, health check,
report), record how it ended. Every step ends in a recorded state."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select

from standby.core.errors import ConfigError, StandbyError
from standby.core.state import RunStep, State

from .common import jsonable, now, one_line, seconds_text
from .model import VM_STEP_KINDS
from .records import Outcome, RunContext, Step
from .shell import (
    Done,
    command_probe,
    kill_group,
    last_line,
    ours,
    poll_until,
    run_shell,
    tcp_probe,
)
from .steps import step_summary


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


class StepExecutor:
    """Executes single steps of a run against the state, the actions and the shell."""

    def __init__(
        self,
        state: State,
        actions: Actions,
        notify: Callable[[str], None],
        write_report: Callable[[int], tuple[Path, Path]],
    ) -> None:
        self.state = state
        self.actions = actions
        self.notify = notify
        self.write_report = write_report

    def run_step(self, ctx: RunContext, step: Step) -> Outcome:
        """Execute one step and record how it ended (never raises for the step's failure)."""
        self._reap(ctx, step)
        self._mark(step.id, "running")
        self.notify(f"  {step.key}: {step_summary(step.spec_view())}")
        t0 = time.monotonic()
        try:
            done = self._dispatch(ctx, step)
        except StandbyError as exc:
            done = Done(False, error=one_line(str(exc)), exit_code=exc.exit_code)
        except Exception as exc:  # a bug or an unexpected library error: record it, go on
            done = Done(False, error=one_line(f"{type(exc).__name__}: {exc}"))
        continued = not done.ok and step.spec.get("on_failure") == "continue"
        self._record(ctx, step, done, continued)
        took = seconds_text(time.monotonic() - t0)
        if done.ok:
            self.notify(f"  {step.key}: succeeded in {took}")
        else:
            note = " (on_failure = continue: the run goes on)" if continued else ""
            self.notify(f"  {step.key}: FAILED after {took}: {done.error}{note}")
        return Outcome(step.key, done.ok, continued, done.error, done.exit_code)

    def _reap(self, ctx: RunContext, step: Step) -> None:
        """Kill a script a killed runner left behind for this step before running it again."""
        pid = step.result.get("pid")
        if step.state == "running" and isinstance(pid, int) and ours(pid, ctx.run_id, step.key):
            kill_group(pid)

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

    def _record(self, ctx: RunContext, step: Step, done: Done, continued: bool) -> None:
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
            row.result = jsonable(result)
            if not done.ok:
                self.state.log(
                    s,
                    "plan-step",
                    f"run {ctx.run_id}: step {step.key} failed: {done.error}",
                    level="warning" if continued else "error",
                    run=ctx.run_id,
                )

    def _dispatch(self, ctx: RunContext, step: Step) -> Done:
        if step.kind == "script":
            return self._script(ctx, step)
        if step.kind == "wait":
            return self._wait(ctx, step)
        if step.kind == "report":
            paths = self.write_report(ctx.run_id)
            return Done(True, result={"json": str(paths[0]), "html": str(paths[1])})
        if step.kind in VM_STEP_KINDS:
            return self._vm(ctx, step)
        raise ConfigError(f"step {step.key}: unknown step kind '{step.kind}'")

    def _vm(self, ctx: RunContext, step: Step) -> Done:
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
        return Done(True, result=jsonable(result))

    # --------------------------------------------------------------- scripts and checks

    def _vms_of(self, ctx: RunContext, step: Step) -> list[str]:
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

    def _env(self, ctx: RunContext, step: Step) -> dict[str, str]:
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

    def _cwd(self, ctx: RunContext) -> Path:
        if not ctx.plan_dir.is_dir():
            raise ConfigError(f"the plan's folder {ctx.plan_dir} is gone (scripts run there)")
        return ctx.plan_dir

    def _script(self, ctx: RunContext, step: Step) -> Done:
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
            return Done(False, res.output, {**result, "timed_out": True}, error)
        if res.code != 0:
            last = last_line(res.output)
            error = f"script `{command}` exited with {res.code}" + (f": {last}" if last else "")
            return Done(False, res.output, result, error)
        return Done(True, res.output, result)

    def _wait(self, ctx: RunContext, step: Step) -> Done:
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
            probe: Callable[[float], tuple[bool, str]] = lambda left: tcp_probe(  # noqa: E731
                str(host), int(spec["tcp"]), min(interval, left, 10.0)
            )
        else:
            target = f"`{spec['command']}`"
            cwd, env = self._cwd(ctx), self._env(ctx, step)
            probe = lambda left: command_probe(str(spec["command"]), cwd, env, left)  # noqa: E731
        return poll_until(probe, who, target, timeout, interval)
