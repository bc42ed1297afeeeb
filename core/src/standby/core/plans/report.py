"""The drill report, computed only from a run's recorded steps: JSON and a static HTML page."""

from __future__ import annotations

import html
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from standby.core.state import PlanRun, RunStep

from .common import aware, iso, now, parse_time, seconds_text
from .model import Plan
from .views import step_row


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


VM_HEADERS = [
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
]


def _vm_table(vms: list[dict[str, Any]]) -> str:
    rows = [
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
        for v in vms
    ]
    return _table(VM_HEADERS, rows)


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
    vms = _vm_table(report["vms"])
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
