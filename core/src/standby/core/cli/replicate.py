"""`standby replicate [VM]` (one cycle each) and `standby replicate --watch` (keep RPO)."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Annotated, Any

import typer

from standby.core.errors import StandbyError

from .common import BarProgress, JsonOpt, emit, home, out

if TYPE_CHECKING:
    from standby.core.engine import CycleReport, Engine


def register(app: typer.Typer) -> None:
    app.command("replicate")(replicate)


def replicate(
    vm: Annotated[str | None, typer.Argument(help="One VM (default: every protection).")] = None,
    watch: Annotated[bool, typer.Option(help="Keep running cycles as RPO targets need.")] = False,
    interval: Annotated[
        float, typer.Option(help="--watch: look for new protections at least this often (s).")
    ] = 10.0,
    parallel: Annotated[
        int, typer.Option(help="Cycles of different VMs at once (several VMs, or --watch).")
    ] = 4,
    wait: Annotated[
        bool, typer.Option(help="Wait for a running replication instead of refusing.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a replication cycle (the first one is the initial full sync).

    With --watch, cycles run whenever a VM's newest point is older than half its RPO target;
    --json then prints one JSON object per line as each cycle ends."""
    from standby.core.engine import opened

    progress = BarProgress() if not as_json and not watch else None
    failed = False
    try:
        with opened(home(), progress, wait_for_lock=wait) as engine:
            if watch:
                _watch(engine, vm, interval, parallel, as_json)
            else:
                failed = _once(engine, vm, parallel, as_json)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; the next run resumes where this one stopped\n")
        raise typer.Exit(130) from None
    if failed:
        raise typer.Exit(1)


def _names(engine: Engine) -> list[str]:
    from sqlalchemy import select

    from standby.core.state import Protection

    with engine.state.session() as s:
        prots = s.scalars(select(Protection).order_by(Protection.id))
        return [p.vm_name for p in prots if p.state == "protected"]


def _once(engine: Engine, vm: str | None, parallel: int, as_json: bool) -> bool:
    """One cycle of `vm`, or of every protection (several at once); True if one failed."""
    names = [vm] if vm else _names(engine)

    def one(name: str) -> dict[str, Any]:
        try:
            r = engine.replicate(name, None if len(names) == 1 else _quiet())
        except StandbyError as exc:
            if len(names) == 1:
                raise
            sys.stderr.write(f"error: {name}: {' '.join(str(exc).split())}\n")
            return {"vm": name, "error": str(exc)}
        if not as_json:
            out.print(r.summary())
            for note in r.notes:
                out.print(f"  note: {note}")
        return dict(r.__dict__)

    if len(names) <= 1:
        reports = [one(n) for n in names]
    else:
        with ThreadPoolExecutor(max(1, min(parallel, len(names)))) as pool:
            reports = list(pool.map(one, names))
    if as_json:
        emit(reports)
    return any(r.get("error") for r in reports)


def _quiet() -> Any:
    from standby.core.engine import NullProgress

    return NullProgress()


def _watch(engine: Engine, vm: str | None, interval: float, parallel: int, as_json: bool) -> None:
    import signal

    from standby.core.engine.watch import Watcher

    def reported(r: CycleReport) -> None:
        if as_json:
            sys.stdout.write(json.dumps(r.__dict__, default=str) + "\n")
            sys.stdout.flush()
            return
        out.print(r.summary())
        for note in r.notes:
            out.print(f"  note: {note}")

    def failed(name: str, exc: StandbyError) -> None:
        sys.stderr.write(f"error: {name}: {' '.join(str(exc).split())}\n")
        sys.stderr.flush()

    watcher = Watcher(
        engine,
        parallel=parallel,
        interval=interval,
        on_report=reported,
        on_error=failed,
        only=vm,
        serve=True,
    )

    def stop(_sig: int, _frame: object) -> None:
        watcher.ask_stop()  # Ctrl-C, or SIGTERM (systemd's stop): no exception mid-lock

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        watcher.run()
    finally:  # a second Ctrl-C while the plugins close interrupts at once
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if watcher.asked:
        raise KeyboardInterrupt  # cycles in flight have checkpointed: exit 130 as for a cycle
