"""`standby plan ...` and `standby drill`: recovery plans on the command line.

Registered on the main app by `register(app)`. Commands that only read or acknowledge
(`plan check` aside) open the state database directly: they need no plugin and no engine.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from standby.core.errors import ConfigError
from standby.core.plans import RUN_KINDS, describe, load_plan
from standby.core.plans import check as check_plan
from standby.core.runner import (
    Actions,
    Runner,
    RunOutcome,
    StepFailed,
    ack,
    list_runs,
    run_view,
    seconds_text,
)
from standby.core.state import State

if TYPE_CHECKING:
    from standby.core.engine import Engine

plan_app = typer.Typer(
    help="Recovery plans: ordered groups of VMs with scripts, checks and manual steps.",
    no_args_is_help=True,
)

out = Console(soft_wrap=True, highlight=False)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
NoWaitOpt = Annotated[
    bool,
    typer.Option("--no-wait", help="At a manual step, exit at once (ack, then `plan resume`)."),
]
PlanFile = Annotated[Path, typer.Argument(metavar="FILE", help="The plan file (TOML).")]


def register(app: typer.Typer) -> None:
    """Add `plan` and `drill` to the main `standby` app."""
    app.add_typer(plan_app, name="plan")
    app.command("drill")(drill)


# ----------------------------------------------------------------------------- plumbing


def _home() -> Path:
    from standby.core import cli  # the main app owns --home

    return cli.home()


def _emit(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _say(line: str) -> None:
    """Progress for people, on stderr (stdout stays clean for --json)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@contextmanager
def _state() -> Iterator[State]:
    """The state database alone (no engine, no plugins)."""
    url = os.environ.get("STANDBY_DB_URL")
    state = State(url) if url else State.at(_home())
    try:
        yield state
    finally:
        state.dispose()


def _actions_for(engine: Engine) -> Actions:
    """The engine's plan actions (imported when a command needs the engine)."""
    from standby.core.lifecycle import EngineActions

    return EngineActions(engine)


@contextmanager
def _runner() -> Iterator[Runner]:
    """A runner over the engine's state, with the engine's actions."""
    from standby.core.engine import opened

    home = _home()
    with opened(home) as engine:
        yield Runner(engine.state, home, _actions_for(engine), notify=_say)


def _run_id(text: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"'{text}' is not a run id (see `standby plan runs`)")
    return int(text)


# ----------------------------------------------------------------------------- check / show


@plan_app.command("check")
def check(file: PlanFile, as_json: JsonOpt = False) -> None:
    """Check a plan: every VM protected, no VM twice, every action complete."""
    plan = load_plan(file)
    from standby.core.engine import opened

    with opened(_home()) as engine:
        problems = check_plan(plan, _actions_for(engine).protected)
    if as_json:
        _emit({"plan": plan.name, "ok": not problems, "problems": problems})
    if problems:
        raise ConfigError(f"{file}: " + "; ".join(problems))
    if not as_json:
        vms = len(plan.vms())
        out.print(f"{file}: OK (plan {plan.name}: {len(plan.groups)} groups, {vms} VMs)")


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
    if target.isdigit() and not Path(target).exists():
        with _state() as state:
            view = run_view(state, _home(), int(target))
        if as_json:
            _emit(view)
        else:
            _print_run(view)
        return
    if kind not in RUN_KINDS:
        raise ConfigError(f"--kind '{kind}' is not one of {', '.join(RUN_KINDS)}")
    plan = load_plan(Path(target))
    rows = describe(plan, kind, keep)
    if as_json:
        _emit({"plan": plan.name, "kind": kind, "dry_run": True, "steps": rows})
        return
    out.print(f"plan {plan.name}: {kind} run, dry run (nothing is executed)")
    if plan.description:
        out.print(f"  {plan.description}")
    for i, r in enumerate(rows):
        out.print(Text(f"{r['seq']:>4}. {_mark(rows, i)} {r['key']:<28} {r['does']}"))
    if any(r["parallel"] > 1 for r in rows):
        out.print("  steps joined by a bracket run in parallel (one per VM)")


def _mark(rows: list[dict[str, Any]], i: int) -> str:
    """A bracket joining the steps of one parallel batch."""
    if rows[i]["parallel"] == 1:
        return " "
    first = i == 0 or rows[i - 1]["batch"] != rows[i]["batch"]
    last = i == len(rows) - 1 or rows[i + 1]["batch"] != rows[i]["batch"]
    return "┌" if first else "└" if last else "│"


def _print_run(view: dict[str, Any]) -> None:
    state = view["state"] + (" (interrupted: `standby plan resume`)" if view["interrupted"] else "")
    took = seconds_text(view["duration_seconds"])
    out.print(
        Text(
            f"run {view['id']}: plan {view['plan']} ({view['plan_path']}), {view['kind']}, "
            f"{state}; started {view['started_at']}, took {took}"
        )
    )
    if view["error"]:
        out.print(Text(f"error: {view['error']}"))
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
            out.print(Text(f"{st['key']} output (tail):"))
            for line in lines:
                out.print(Text(f"    {line}"))
    if view.get("report"):
        out.print(Text(f"report: {view['report']}"))


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
    with _state() as state:
        rows = list_runs(state, _home(), limit)
    if as_json:
        _emit(rows)
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
        out.print(Text("  ".join([*cells, r[-1]]).rstrip()))


# ----------------------------------------------------------------------------- runs


def _report_outcome(outcome: RunOutcome, as_json: bool) -> None:
    """What a run command prints when the runner returns (finished or waiting)."""
    rid = outcome.run_id
    if as_json:
        if outcome.kind == "drill" and outcome.report and outcome.waiting is None:
            _emit({**outcome.report, "state": outcome.state, "report_path": outcome.report_path})
        else:
            _emit(outcome.__dict__)
        return
    if outcome.waiting is not None:
        w = outcome.waiting
        out.print(
            Text(
                f"run {rid} is waiting at step {w['key']} (step id {w['id']}): {w['message']}\n"
                f"acknowledge with `standby plan ack {rid} {w['key']}`, "
                f"then continue with `standby plan resume {rid}`"
            )
        )
        return
    out.print(Text(f"plan {outcome.plan_name}: {outcome.kind} run {rid} {outcome.state}"))
    if outcome.continued:
        out.print(Text(f"  continued past failed steps: {', '.join(outcome.continued)}"))
    if outcome.report_path:
        out.print(Text(f"report: {outcome.report_path}"))


def _drive(run: Runner, rid: int, no_wait: bool, as_json: bool, skip: list[str]) -> None:
    try:
        outcome = run.run(rid, wait=not no_wait, skip=skip)
    except StepFailed:
        if as_json:
            _emit(run_view(run.state, run.home, rid))
        raise
    _report_outcome(outcome, as_json)


def _start(file: Path, kind: str, no_wait: bool, as_json: bool, keep: bool = False) -> None:
    plan = load_plan(file)
    with _runner() as run:
        rid = run.start(plan, file, kind, keep)
        _say(f"plan {plan.name}: {kind} run {rid} started (`standby plan show {rid}`)")
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
    rid = _run_id(run_id)
    with _state() as state:
        done = ack(state, rid, step)
        active = run_view(state, _home(), rid)["active"]
    if as_json:
        _emit({**done, "runner_active": active})
        return
    then = (
        "the waiting runner continues" if active else f"continue with `standby plan resume {rid}`"
    )
    out.print(Text(f"run {rid}: step {done['step']} acknowledged by {done['acked_by']}; {then}"))


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
