"""`standby plan ...` and `standby drill`: recovery plans on the command line.

Commands that only read or acknowledge open the state database alone: they need no plugin
and no engine. Running a plan composes the engine, the lifecycle (the plan's actions) and
the plan runner.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from standby.core.errors import ConfigError

from .common import JsonOpt, emit, home, home_state, plain, say

if TYPE_CHECKING:
    from standby.core.plans.records import RunOutcome
    from standby.core.plans.runner import Runner

plan_app = typer.Typer(
    help="Recovery plans: ordered groups of VMs with scripts, checks and manual steps.",
    no_args_is_help=True,
)

NoWaitOpt = Annotated[
    bool,
    typer.Option("--no-wait", help="At a manual step, exit at once (ack, then `plan resume`)."),
]
PlanFile = Annotated[Path, typer.Argument(metavar="FILE", help="The plan file (TOML).")]


def register(app: typer.Typer) -> None:
    """Add `plan` and `drill` to the main `standby` app."""
    app.add_typer(plan_app, name="plan")
    app.command("drill")(drill)


def _line(text: str) -> None:
    """One line exactly as given (no markup, no wrapping)."""
    plain.print(text, markup=False)


@contextmanager
def _runner() -> Iterator[Runner]:
    """A runner over the engine's state, with the lifecycle's plan actions."""
    from standby.core.engine import opened
    from standby.core.lifecycle import PlanActions
    from standby.core.plans.runner import Runner

    with opened(home()) as engine:
        yield Runner(engine.state, home(), PlanActions(engine), notify=say)


def _run_id(text: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"'{text}' is not a run id (see `standby plan runs`)")
    return int(text)


# ----------------------------------------------------------------------------- check / show


@plan_app.command("check")
def check(file: PlanFile, as_json: JsonOpt = False) -> None:
    """Check a plan: every VM protected, no VM twice, every action complete."""
    from standby.core.engine import opened
    from standby.core.lifecycle import PlanActions
    from standby.core.plans import check as check_plan
    from standby.core.plans import load_plan

    plan = load_plan(file)
    with opened(home()) as engine:
        problems = check_plan(plan, PlanActions(engine).protected)
    if as_json:
        emit({"plan": plan.name, "ok": not problems, "problems": problems})
    if problems:
        raise ConfigError(f"{file}: " + "; ".join(problems))
    if not as_json:
        vms = len(plan.vms())
        _line(f"{file}: OK (plan {plan.name}: {len(plan.groups)} groups, {vms} VMs)")


@plan_app.command("show")
def show(
    target: Annotated[str, typer.Argument(metavar="FILE | RUN", help="A plan file or a run id.")],
    kind: Annotated[
        str, typer.Option("--kind", help="For a file: test|planned|unplanned|drill|...")
    ] = "test",
    keep: Annotated[bool, typer.Option("--keep", help="For a drill: without cleanup.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """A plan's steps in order (a dry run: nothing is executed), or a run and its steps."""
    from standby.core.plans import RUN_KINDS, describe, load_plan

    if target.isdigit() and not Path(target).exists():
        from standby.core.plans.views import run_view

        with home_state() as state:
            view = run_view(state, home(), int(target))
        if as_json:
            emit(view)
        else:
            _print_run(view)
        return
    if kind not in RUN_KINDS:
        raise ConfigError(f"--kind '{kind}' is not one of {', '.join(RUN_KINDS)}")
    plan = load_plan(Path(target))
    rows = describe(plan, kind, keep)
    if as_json:
        emit({"plan": plan.name, "kind": kind, "dry_run": True, "steps": rows})
        return
    _line(f"plan {plan.name}: {kind} run, dry run (nothing is executed)")
    if plan.description:
        _line(f"  {plan.description}")
    for i, r in enumerate(rows):
        _line(f"{r['seq']:>4}. {_mark(rows, i)} {r['key']:<28} {r['does']}")
    if any(r["parallel"] > 1 for r in rows):
        _line("  steps joined by a bracket run in parallel (one per VM)")


def _mark(rows: list[dict[str, Any]], i: int) -> str:
    """A bracket joining the steps of one parallel batch."""
    if rows[i]["parallel"] == 1:
        return " "
    first = i == 0 or rows[i - 1]["batch"] != rows[i]["batch"]
    last = i == len(rows) - 1 or rows[i + 1]["batch"] != rows[i]["batch"]
    return "┌" if first else "└" if last else "│"


def _print_run(view: dict[str, Any]) -> None:
    from standby.core.plans.common import seconds_text

    state = view["state"] + (" (interrupted: `standby plan resume`)" if view["interrupted"] else "")
    took = seconds_text(view["duration_seconds"])
    _line(
        f"run {view['id']}: plan {view['plan']} ({view['plan_path']}), {view['kind']}, "
        f"{state}; started {view['started_at']}, took {took}"
    )
    if view["error"]:
        _line(f"error: {view['error']}")
    rows = [
        [
            str(st["id"]),
            st["key"],
            st["kind"],
            st["state"],
            (st["started_at"] or "-")[11:19] or "-",
            seconds_text(st["duration_seconds"]),
            str(st["attempts"]),
            st["error"] or _note(st),
        ]
        for st in view["steps"]
    ]
    _columns(["id", "step", "kind", "state", "started", "took", "tries", "note"], rows)
    for st in view["steps"]:
        if st["kind"] != "script" and st["state"] != "failed":
            continue
        lines = [line for line in st["output_tail"].splitlines() if line.strip()][-5:]
        if lines:
            _line(f"{st['key']} output (tail):")
            for line in lines:
                _line(f"    {line}")
    if view.get("report"):
        _line(f"report: {view['report']}")


def _note(st: dict[str, Any]) -> str:
    r = st["result"]
    if st["kind"] == "manual":
        if "acked_by" in r:
            return f"acked by {r['acked_by']}"
        return f"ack: standby plan ack RUN {st['key']}" if st["state"] == "waiting" else ""
    if st["kind"] == "failover" and "vm_name" in r:
        return f"{r['vm_name']} from point {r.get('point_id')}"
    if st["kind"] == "wait" and "attempts" in r:
        return f"{r.get('target')}: {r['attempts']} attempt(s)"
    if "skipped_by" in r:
        return f"skipped by {r['skipped_by']}"
    return ""


@plan_app.command("runs")
def runs(
    limit: Annotated[int, typer.Option(help="How many, newest last.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Plan runs and their states."""
    from standby.core.plans.common import seconds_text
    from standby.core.plans.views import list_runs

    with home_state() as state:
        rows = list_runs(state, home(), limit)
    if as_json:
        emit(rows)
        return
    _columns(
        ["run", "plan", "kind", "state", "started", "took", "error"],
        [
            [
                str(r["id"]),
                r["plan"],
                r["kind"],
                r["state"] + (" (interrupted)" if r["interrupted"] else ""),
                (r["started_at"] or "-")[:19],
                seconds_text(r["duration_seconds"]),
                r["error"],
            ]
            for r in rows
        ],
    )


def _columns(headers: list[str], rows: list[list[str]]) -> None:
    """Plain aligned columns (never truncated; the last one runs on)."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers) - 1)]
    for r in [headers, *rows]:
        cells = [c.ljust(w) for c, w in zip(r, widths, strict=False)]
        _line("  ".join([*cells, r[-1]]).rstrip())


# ----------------------------------------------------------------------------- runs


def _report_outcome(outcome: RunOutcome, as_json: bool) -> None:
    """What a run command prints when the runner returns (finished or waiting)."""
    rid = outcome.run_id
    if as_json:
        if outcome.kind == "drill" and outcome.report and outcome.waiting is None:
            emit({**outcome.report, "state": outcome.state, "report_path": outcome.report_path})
        else:
            emit(outcome.__dict__)
        return
    if outcome.waiting is not None:
        w = outcome.waiting
        _line(
            f"run {rid} is waiting at step {w['key']} (step id {w['id']}): {w['message']}\n"
            f"acknowledge with `standby plan ack {rid} {w['key']}`, "
            f"then continue with `standby plan resume {rid}`"
        )
        return
    _line(f"plan {outcome.plan_name}: {outcome.kind} run {rid} {outcome.state}")
    if outcome.continued:
        _line(f"  continued past failed steps: {', '.join(outcome.continued)}")
    if outcome.report_path:
        _line(f"report: {outcome.report_path}")


def _drive(run: Runner, rid: int, no_wait: bool, as_json: bool, skip: list[str]) -> None:
    from standby.core.plans.runner import StepFailed
    from standby.core.plans.views import run_view

    try:
        outcome = run.run(rid, wait=not no_wait, skip=skip)
    except StepFailed:
        if as_json:
            emit(run_view(run.state, run.home, rid))
        raise
    _report_outcome(outcome, as_json)


def _start(file: Path, kind: str, no_wait: bool, as_json: bool, keep: bool = False) -> None:
    from standby.core.plans import load_plan

    plan = load_plan(file)
    with _runner() as run:
        rid = run.start(plan, file, kind, keep)
        say(f"plan {plan.name}: {kind} run {rid} started (`standby plan show {rid}`)")
        _drive(run, rid, no_wait, as_json, [])


@plan_app.command("failover")
def failover(
    file: PlanFile,
    test: Annotated[bool, typer.Option("--test", help="Test failover (isolated).")] = False,
    planned: Annotated[
        bool, typer.Option("--planned", help="Planned: final sync, source stopped.")
    ] = False,
    unplanned: Annotated[
        bool, typer.Option("--unplanned", help="Unplanned: the source is lost.")
    ] = False,
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fail every VM of the plan over, group by group, with the plan's actions."""

    kinds = [k for k, on in (("test", test), ("planned", planned), ("unplanned", unplanned)) if on]
    if len(kinds) != 1:
        raise ConfigError("give exactly one of --test, --planned, --unplanned")
    _start(file, kinds[0], no_wait, as_json)


@plan_app.command("cleanup")
def cleanup(file: PlanFile, no_wait: NoWaitOpt = False, as_json: JsonOpt = False) -> None:
    """Remove the test failovers of every VM of the plan."""
    _start(file, "cleanup", no_wait, as_json)


@plan_app.command("commit")
def commit(file: PlanFile, no_wait: NoWaitOpt = False, as_json: JsonOpt = False) -> None:
    """Commit the failover of every VM of the plan (the DR site becomes the production)."""
    _start(file, "commit", no_wait, as_json)


@plan_app.command("reprotect")
def reprotect(file: PlanFile, no_wait: NoWaitOpt = False, as_json: JsonOpt = False) -> None:
    """Re-protect every VM of the plan in the other direction."""
    _start(file, "reprotect", no_wait, as_json)


@plan_app.command("failback")
def failback(file: PlanFile, no_wait: NoWaitOpt = False, as_json: JsonOpt = False) -> None:
    """Fail every VM of the plan back to its home site, with the plan's actions."""
    _start(file, "failback", no_wait, as_json)


@plan_app.command("resume")
def resume(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    skip: Annotated[
        list[str] | None,
        typer.Option("--skip", help="Mark this failed or waiting step skipped first (repeatable)."),
    ] = None,
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Continue an interrupted, waiting or failed run; finished steps are not repeated."""
    rid = _run_id(run_id)
    with _runner() as run:
        _drive(run, rid, no_wait, as_json, skip or [])


@plan_app.command("ack")
def ack_cmd(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    step: Annotated[str, typer.Argument(metavar="STEP", help="Step key or step id.")],
    as_json: JsonOpt = False,
) -> None:
    """Acknowledge a manual step a run waits at (from any shell)."""
    from standby.core.plans.records import ack
    from standby.core.plans.views import run_view

    rid = _run_id(run_id)
    with home_state() as state:
        done = ack(state, rid, step)
        active = run_view(state, home(), rid)["active"]
    if as_json:
        emit({**done, "runner_active": active})
        return
    then = (
        "the waiting runner continues" if active else f"continue with `standby plan resume {rid}`"
    )
    _line(f"run {rid}: step {done['step']} acknowledged by {done['acked_by']}; {then}")


def drill(
    file: PlanFile,
    no_wait: NoWaitOpt = False,
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave the test VMs running (`plan cleanup` later).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Rehearse a plan: test failover, health checks, a report, then cleanup."""
    _start(file, "drill", no_wait, as_json, keep)
