"""The `standby` command line (typer + rich).

Exit codes: 0 ok; 1 other standby error; 2 bad configuration or input; 3 not found;
4 authentication; 5 not supported / cannot be protected; 6 plugin failure; 7 transient
(retry); 8 busy (another standby process holds the VM or site); 130 interrupted.
"""

from __future__ import annotations

import json
import sys
import time
import tomllib
from dataclasses import asdict
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from sqlalchemy import select

from standby.core import config, plugins
from standby.core.cli_plans import register as register_plans
from standby.core.engine import CycleReport, due, opened, status_rows
from standby.core.errors import ConfigError, NotFound, StandbyError
from standby.core.state import Event, Protection, RecoveryPoint

app = typer.Typer(
    help="standby: replicate VMs to a DR site, keep recovery points, fail over.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
sites_app = typer.Typer(help="Configured sites (one TOML file each).", no_args_is_help=True)
app.add_typer(sites_app, name="sites")
register_plans(app)

out = Console()
err = Console(stderr=True)
_home: Path | None = None

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def home() -> Path:
    return _home or config.home()


@app.callback()
def _main(
    home_dir: Annotated[
        Path | None,
        typer.Option(
            "--home",
            help="State and config directory (default $STANDBY_HOME or ~/.config/standby).",
        ),
    ] = None,
) -> None:
    global _home
    _home = home_dir


def emit(data: Any) -> None:
    """JSON to stdout for scripts."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


class BarProgress:
    """Engine progress as a rich bar on stderr (only on a terminal)."""

    def __init__(self, steps: bool = True) -> None:
        self.steps = steps
        self.bar: Progress | None = None
        self.task: TaskID | None = None

    def start(self, description: str, total: int) -> None:
        if total == 0:  # a step of a long operation: one line, terminal or not
            if self.steps:
                err.print(f"  {description}", highlight=False)
            return
        if not err.is_terminal:
            return
        self.bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task, amount)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


# ----------------------------------------------------------------------------- plugins/sites


@app.command("plugins")
def plugins_cmd(as_json: JsonOpt = False) -> None:
    """List installed plugins and whether each can work on this machine."""
    rows = plugins.list_plugins()
    if as_json:
        emit([r.__dict__ for r in rows])
        return
    table = Table("plugin", "role", "distribution", "status")
    for r in rows:
        status = "[green]ok[/]" if r.ok else f"[red]unavailable[/]: {r.reason}"
        table.add_row(r.name, r.role, f"{r.distribution} {r.version}", status)
    out.print(table)


@sites_app.command("list")
def sites_list(as_json: JsonOpt = False) -> None:
    """List configured sites."""
    sites = config.load_sites(home())
    if as_json:
        emit([{"name": s.name, "plugin": s.plugin, "path": str(s.path)} for s in sites.values()])
        return
    table = Table("site", "plugin", "file")
    for s in sites.values():
        table.add_row(s.name, s.plugin, str(s.path))
    out.print(table)


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


@sites_app.command("add")
def sites_add(
    name: str,
    plugin: Annotated[str, typer.Option("--plugin", help="Plugin name (see `standby plugins`).")],
    settings: Annotated[
        list[str] | None, typer.Option("--set", help="key=value (repeatable).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing site file.")] = False,
) -> None:
    """Write and validate `sites/NAME.toml`."""
    data: dict[str, Any] = {}
    for item in settings or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set '{item}': expected key=value")
        data[key.strip()] = _parse_value(value.strip())
    directory = config.sites_dir(home())
    path = directory / f"{name}.toml"
    if path.exists() and not force:
        raise ConfigError(f"site '{name}' exists ({path}); use --force to replace it")
    if not config.SITE_NAME_RE.match(name):
        raise ConfigError(f"site name '{name}' must be letters, digits, '.', '_' or '-'")
    text = _toml({"plugin": plugin, **data})
    site = config.Site(name=name, plugin=plugin, path=path, raw=data)
    _validate_site(site)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    out.print(f"site [bold]{name}[/] written to {path}")


def _validate_site(site: config.Site) -> None:
    names = {p.name for p in plugins.list_plugins()}
    if site.plugin not in names:
        raise ConfigError(f"unknown plugin '{site.plugin}' (installed: {', '.join(sorted(names))})")
    for role in ("source", "target"):
        try:
            cls = (
                plugins.source_class(site.plugin)
                if role == "source"
                else plugins.target_class(site.plugin)
            )
        except StandbyError:
            continue
        cls(site)  # parses and validates the vendor keys


def _toml(data: dict[str, Any]) -> str:
    lines = []
    tables = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    for key, table in tables:
        lines.append(f"\n[{key}]")
        lines += [f"{k!r} = {json.dumps(v)}".replace("'", '"') for k, v in table.items()]
    return "\n".join(lines) + "\n"


@sites_app.command("check")
def sites_check(name: str, as_json: JsonOpt = False) -> None:
    """Connect to a site and report what it offers."""
    site = config.get_site(name, home())
    facts: dict[str, list[str]] = {}
    for role, getter in (("source", plugins.source_class), ("target", plugins.target_class)):
        try:
            cls = getter(site.plugin)
        except StandbyError as exc:
            facts[role] = [f"not available: {exc}"]
            continue
        plugin = cls(site)
        try:
            facts[role] = plugin.check()
        except StandbyError as exc:
            if role == "source" or "pool_dir" not in str(exc):
                raise
            facts[role] = [f"not usable as a target: {exc}"]
        finally:
            plugin.close()
    if as_json:
        emit({"site": name, "plugin": site.plugin, **facts})
        return
    for role, lines in facts.items():
        for line in lines:
            out.print(f"{name} ({role}): {line}")


@app.command("vms")
def vms(site: str, as_json: JsonOpt = False) -> None:
    """List the VMs of a source site."""
    s = config.get_site(site, home())
    src = plugins.source_class(s.plugin)(s)
    try:
        src.connect()
        found = src.list_vms()
    finally:
        src.close()
    if as_json:
        emit([v.to_dict() for v in found])
        return
    table = Table("name", "id", "cpus", "memory", "firmware", "disks", "state")
    for v in found:
        disks = ", ".join(f"{d.name} {_size(d.size)} {d.format}" for d in v.disks)
        table.add_row(
            v.name, v.id, str(v.cpus), f"{v.memory_mib} MiB", v.firmware.value, disks, v.power_state
        )
    out.print(table)


# ----------------------------------------------------------------------------- protect


@app.command("protect")
def protect(
    vm: str,
    source: Annotated[str, typer.Option("--from", help="Source site.")],
    target: Annotated[str, typer.Option("--to", help="Target (DR) site.")],
    policy: Annotated[str, typer.Option(help="Policy name (policies/NAME.toml).")] = "default",
    rpo: Annotated[str | None, typer.Option(help="RPO target, e.g. 15m.")] = None,
    retain: Annotated[int | None, typer.Option(help="Recovery points to keep.")] = None,
    retain_age: Annotated[str | None, typer.Option(help="Drop points older than this.")] = None,
    app_consistent_every: Annotated[
        str | None, typer.Option(help="Take an app-consistent point this often.")
    ] = None,
    bandwidth_mbps: Annotated[
        float | None, typer.Option(help="Bandwidth limit for replication, megabits/s.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Protect a VM: validate it against the target and record the protection."""
    base = config.load_policy(policy, home())
    overrides: dict[str, Any] = {}
    if rpo is not None:
        overrides["rpo_seconds"] = config.parse_duration(rpo, "--rpo")
    if retain is not None:
        overrides["retain_count"] = retain
    if retain_age is not None:
        overrides["retain_age_seconds"] = config.parse_duration(retain_age, "--retain-age")
    if app_consistent_every is not None:
        overrides["app_consistent_every_seconds"] = config.parse_duration(
            app_consistent_every, "--app-consistent-every"
        )
    if bandwidth_mbps is not None:
        overrides["bandwidth_mbps"] = bandwidth_mbps
    pol = base.model_copy(update=overrides).checked("policy")
    with opened(home()) as engine:
        pid = engine.protect(vm, source, target, pol)
    if as_json:
        emit(
            {
                "protection": pid,
                "vm": vm,
                "source": source,
                "target": target,
                "policy": pol.model_dump(),
            }
        )
    else:
        out.print(
            f"protected [bold]{vm}[/] {source} -> {target} (protection {pid}); "
            "run `standby replicate` for the initial sync"
        )


@app.command("unprotect")
def unprotect(
    vm: str,
    keep_replicas: Annotated[
        bool, typer.Option(help="Leave the replica files at the target (state is dropped).")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Stop protecting a VM and remove its recovery points at the target."""
    if not yes and not keep_replicas:
        if not sys.stdin.isatty():
            raise ConfigError("unprotect removes every recovery point; add --yes to confirm")
        typer.confirm(f"Remove every recovery point of {vm}?", abort=True)
    with opened(home()) as engine:
        n = engine.unprotect(vm, keep_replicas=keep_replicas)
    out.print(
        f"{vm}: no longer protected; {n} recovery point(s) "
        f"{'kept as files' if keep_replicas else 'removed'}"
    )


def _report_line(r: CycleReport) -> str:
    rate = r.bytes_read / r.seconds / (1 << 20) if r.seconds else 0.0
    resumed = ", resumed" if r.resumed else ""
    return (
        f"{r.vm}: point {r.point_id} ({r.kind}, {r.consistency}{resumed}) read "
        f"{_size(r.bytes_read)}, wrote {_size(r.bytes_written)}, zeroed {_size(r.bytes_zeroed)} "
        f"in {r.seconds:.1f}s ({rate:.0f} MiB/s)"
    )


@app.command("replicate")
def replicate(
    vm: Annotated[str | None, typer.Argument(help="One VM (default: every protection).")] = None,
    watch: Annotated[bool, typer.Option(help="Keep running cycles as RPO targets need.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between --watch checks.")] = 10.0,
    wait: Annotated[
        bool, typer.Option(help="Wait for a running replication instead of refusing.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a replication cycle (the first one is the initial full sync)."""
    reports: list[dict[str, Any]] = []
    try:
        _replicate_loop(vm, watch, interval, wait, as_json, reports)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; the next run resumes where this one stopped\n")
        raise typer.Exit(130) from None
    if as_json:
        emit(reports)
    if any(r.get("error") for r in reports):
        raise typer.Exit(1)


def _replicate_loop(
    vm: str | None,
    watch: bool,
    interval: float,
    wait: bool,
    as_json: bool,
    reports: list[dict[str, Any]],
) -> None:
    with opened(home(), BarProgress() if not as_json else None, wait_for_lock=wait) as engine:
        while True:
            if vm:
                names = [vm]
            elif watch:
                names = due(engine.state, home())
            else:
                with engine.state.session() as s:
                    names = [
                        p.vm_name for p in s.scalars(select(Protection)) if p.state == "protected"
                    ]
            for name in names:
                try:
                    r = engine.replicate(name)
                    reports.append(r.__dict__)
                    if not as_json:
                        out.print(_report_line(r))
                        for note in r.notes:
                            out.print(f"  note: {note}")
                except StandbyError as exc:
                    if not watch and (vm or len(names) == 1):
                        raise
                    reports.append({"vm": name, "error": str(exc)})
                    sys.stderr.write(f"error: {name}: {' '.join(str(exc).split())}\n")
            if not watch:
                break
            time.sleep(interval)


@app.command("status")
def status(as_json: JsonOpt = False) -> None:
    """RPO and health of every protection."""
    with opened(home()) as engine:
        rows = status_rows(engine.state, home())
    if as_json:
        emit(rows)
        return
    table = Table("vm", "source -> target", "points", "latest", "RPO", "target", "health")
    for r in rows:
        rpo = f"{r['rpo_seconds']:.0f}s" if r["rpo_seconds"] is not None else "-"
        health = r["health"] if r["health"] == "ok" else f"[yellow]{r['health']}[/]: {r['reason']}"
        table.add_row(
            r["vm"],
            f"{r['source']} -> {r['target']}",
            str(r["points"]),
            str(r["latest_point_time"] or "-")[:19],
            rpo,
            f"{r['rpo_target_seconds']}s",
            health,
        )
    out.print(table)


@app.command("events")
def events(
    vm: Annotated[str | None, typer.Argument(help="Only this VM's events.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest last.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """What standby did: protections, points, prunes, failovers, failures."""
    with opened(home()) as engine, engine.state.session() as s:
        query = select(Event).order_by(Event.id.desc()).limit(limit)
        if vm:
            query = query.where(Event.protection_id == engine.state.protection(s, vm).id)
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
    table = Table("time", "level", "kind", "message")
    for r in rows:
        table.add_row(r["time"][:19], r["level"], r["kind"], r["message"])
    out.print(table)


@app.command("points")
def points(vm: str, as_json: JsonOpt = False) -> None:
    """Recovery points of a protected VM (newest last)."""
    with opened(home()) as engine, engine.state.session() as s:
        prot = engine.state.protection(s, vm)
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
    table = Table("point", "time (source)", "consistency", "disks")
    for r in rows:
        disks = ", ".join(f"{d} {_size(v['size'])}" for d, v in r["disks"].items())
        table.add_row(str(r["id"]), r["time"], r["consistency"], disks)
    out.print(table)


@app.command("failover")
def failover(
    vm_or_action: Annotated[str, typer.Argument(metavar="VM | cleanup")],
    vm: Annotated[str | None, typer.Argument(help="With `cleanup`: the VM.")] = None,
    test: Annotated[bool, typer.Option("--test", help="Test failover (isolated network).")] = False,
    planned: Annotated[
        bool, typer.Option("--planned", help="Shut the source down, final cycle, zero loss.")
    ] = False,
    unplanned: Annotated[
        bool, typer.Option("--unplanned", help="From the latest (or --point) recovery point.")
    ] = False,
    point: Annotated[int | None, typer.Option(help="Recovery point id (default: latest).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fail a VM over (--test, --planned or --unplanned), or `failover cleanup VM`."""
    with opened(home(), BarProgress()) as engine:
        if vm_or_action == "cleanup":
            if not vm:
                raise ConfigError("usage: standby failover cleanup VM")
            ids = engine.cleanup(vm)
            if as_json:
                emit({"vm": vm, "cleaned": ids})
            else:
                out.print(f"{vm}: test failover cleaned up (everything it created is removed)")
            return
        if vm is not None:
            raise ConfigError(f"unexpected argument '{vm}'")
        kinds = [
            k for k, on in (("test", test), ("planned", planned), ("unplanned", unplanned)) if on
        ]
        if len(kinds) != 1:
            raise ConfigError("choose one of --test, --planned, --unplanned")
        if planned and point is not None:
            raise ConfigError("a planned failover uses the final point; --point is not allowed")
        fo = engine.failover(vm_or_action, kind=kinds[0], point_id=point)
        data = _failover_data(vm_or_action, fo)
    if as_json:
        emit(data)
        return
    if fo.kind == "test":
        out.print(
            f"{vm_or_action}: test failover {data['failover']} running as "
            f"[bold]{data['target_vm']}[/] from point {data['point']}; "
            f"clean up with `standby failover cleanup {vm_or_action}`"
        )
        return
    loss = (
        "zero data loss (final point after shutdown, verified)"
        if fo.kind == "planned"
        else f"data-loss window {data['data_loss_seconds']:.0f}s (point taken {data['point_time']})"
    )
    out.print(
        f"{vm_or_action}: {fo.kind} failover {data['failover']}: [bold]{data['target_vm']}[/] "
        f"running from point {data['point']}; {loss}. Next: `standby commit {vm_or_action}`, "
        f"then `standby reprotect {vm_or_action}`"
    )


def _failover_data(vm: str, fo: Any) -> dict[str, Any]:
    return {
        "vm": vm,
        "failover": fo.id,
        "kind": fo.kind,
        "point": fo.point_id,
        "point_time": fo.point_time.replace(tzinfo=UTC).isoformat(timespec="seconds")
        if fo.point_time
        else None,
        "data_loss_seconds": fo.data_loss_seconds,
        "target_vm": fo.vm_name,
        "ref": fo.ref,
    }


@app.command("commit")
def commit(vm: str, as_json: JsonOpt = False) -> None:
    """Finish a failover: earlier recovery points can no longer be chosen, and are freed."""
    with opened(home(), BarProgress()) as engine:
        fo = engine.commit(vm)
    if as_json:
        emit(_failover_data(vm, fo))
    else:
        out.print(f"{vm}: failover {fo.id} committed; next: `standby reprotect {vm}`")


@app.command("reprotect")
def reprotect(vm: str, as_json: JsonOpt = False) -> None:
    """Replicate a failed-over (committed) VM back to the site it came from."""
    with opened(home(), BarProgress()) as engine:
        prot = engine.reprotect(vm)
    data = {"vm": vm, "source": prot.source_site, "target": prot.target_site}
    if as_json:
        emit(data)
    else:
        out.print(
            f"{vm}: re-protected {prot.source_site} -> {prot.target_site}; run "
            f"`standby replicate {vm}` (it compares against the disks already there)"
        )


@app.command("failback")
def failback(vm: str, as_json: JsonOpt = False) -> None:
    """Planned failover back to the VM's home site (after re-protect has caught up)."""
    with opened(home(), BarProgress()) as engine:
        fo = engine.failback(vm)
        data = _failover_data(vm, fo)
    if as_json:
        emit(data)
    else:
        out.print(
            f"{vm}: failed back, [bold]{fo.vm_name}[/] running at home from point "
            f"{fo.point_id} (zero data loss); next: `standby commit {vm}` and "
            f"`standby reprotect {vm}`"
        )


def _money(x: float) -> str:
    return f"{x:.2f}" if x >= 1 else f"{x:.4f}"


@app.command("cost")
def cost(
    vm: Annotated[str | None, typer.Argument(help="A protected VM (default: all).")] = None,
    site: Annotated[str | None, typer.Option(help="Only protections to this target site.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Estimated monthly storage cost of replicas and points, and hourly cost after failover."""
    if vm and site:
        raise ConfigError("give a VM or --site, not both")
    with opened(home()) as engine:
        estimates = engine.cost(vm, site)
    if not estimates:
        raise NotFound("no protection to estimate" + (f" at site '{site}'" if site else ""))
    if as_json:
        emit(
            [
                {
                    "currency": e.currency,
                    "prices_from": e.prices_from,
                    "monthly_storage": round(e.monthly, 4),
                    "hourly_after_failover": round(e.hourly, 4),
                    "lines": [asdict(line) for line in e.lines],
                    "notes": e.notes,
                }
                for e in estimates
            ]
        )
        return
    for e in estimates:
        table = Table("VM", "item", "quantity", f"price ({e.currency})", "per month", "per hour")
        for line in e.lines:
            table.add_row(
                line.protection,
                line.item,
                f"{line.quantity:g} {line.unit}",
                f"{line.unit_price:.4f}",
                _money(line.monthly) if line.monthly else "",
                f"{line.hourly:.4f}" if line.hourly else "",
            )
        out.print(table)
        out.print(
            f"while protected: [bold]{_money(e.monthly)} {e.currency}/month[/]; after failover: "
            f"[bold]{e.hourly:.4f} {e.currency}/hour[/] more"
        )
        for note in e.notes:
            out.print(f"note: {note}", highlight=False)


def main() -> None:
    """Entry point: run the app and turn standby errors into one line and an exit code."""
    try:
        app()
    except StandbyError as exc:
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; the next run resumes where this one stopped\n")
        sys.exit(130)
