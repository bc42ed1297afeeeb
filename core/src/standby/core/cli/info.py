"""`standby status`, `standby events` and `standby points VM`: what the state says."""

from __future__ import annotations

from datetime import UTC
from typing import Annotated, Any

import typer

from .common import JsonOpt, emit, home, home_state, out, size_text, table


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("events")(events)
    app.command("points")(points)


def status(as_json: JsonOpt = False) -> None:
    """RPO and health of every protection."""
    from standby.core.engine import status_rows

    with home_state() as state:
        rows = status_rows(state, home())
    if as_json:
        emit(rows)
        return
    t = table("vm", "source -> target", "points", "latest", "RPO", "target", "health")
    for r in rows:
        rpo = f"{r['rpo_seconds']:.0f}s" if r["rpo_seconds"] is not None else "-"
        health = r["health"] if r["health"] == "ok" else f"[yellow]{r['health']}[/]: {r['reason']}"
        t.add_row(
            r["vm"],
            f"{r['source']} -> {r['target']}",
            str(r["points"]),
            str(r["latest_point_time"] or "-")[:19],
            rpo,
            f"{r['rpo_target_seconds']}s",
            health,
        )
    out.print(t)


def events(
    vm: Annotated[str | None, typer.Argument(help="Only this VM's events.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest last.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """What standby did: protections, points, prunes, failovers, failures."""
    from sqlalchemy import select

    from standby.core.state import Event

    with home_state() as state, state.session() as s:
        query = select(Event).order_by(Event.id.desc()).limit(limit)
        if vm:
            query = query.where(Event.protection_id == state.protection(s, vm).id)
        rows = [
            {
                "time": e.at.replace(tzinfo=UTC).isoformat(timespec="seconds"),
                "level": e.level,
                "kind": e.kind,
                "message": e.message,
            }
            for e in reversed(s.scalars(query).all())
        ]
    if as_json:
        emit(rows)
        return
    t = table("time", "level", "kind", "message")
    for r in rows:
        t.add_row(r["time"][:19], r["level"], r["kind"], r["message"])
    out.print(t)


def points(vm: str, as_json: JsonOpt = False) -> None:
    """Recovery points of a protected VM (newest last)."""
    from sqlalchemy import select

    from standby.core.state import RecoveryPoint

    with home_state() as state, state.session() as s:
        prot = state.protection(s, vm)
        rows: list[dict[str, Any]] = [
            {
                "id": p.id,
                "time": p.created_at.replace(tzinfo=UTC).isoformat(timespec="seconds"),
                "consistency": p.consistency,
                "disks": {d.disk: {"size": d.size, "manifest": d.digest} for d in p.disks},
                "notes": p.notes,
            }
            for p in s.scalars(
                select(RecoveryPoint)
                .where(RecoveryPoint.protection_id == prot.id, RecoveryPoint.state == "visible")
                .order_by(RecoveryPoint.id)
            )
        ]
    if as_json:
        emit(rows)
        return
    t = table("point", "time (source)", "consistency", "disks")
    for r in rows:
        disks = ", ".join(f"{d} {size_text(v['size'])}" for d, v in r["disks"].items())
        t.add_row(str(r["id"]), r["time"], r["consistency"], disks)
    out.print(t)
