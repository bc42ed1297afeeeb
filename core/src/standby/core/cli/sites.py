"""`standby plugins`, `standby sites list|add|check` and `standby vms SITE`."""

from __future__ import annotations

import json
import tomllib
from typing import Annotated, Any

import typer

from standby.core import config, plugins
from standby.core.errors import ConfigError, NotFound, RoleNotConfigured, StandbyError

from .common import JsonOpt, emit, home, out, size_text, table

sites_app = typer.Typer(help="Configured sites (one TOML file each).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("plugins")(plugins_cmd)
    app.command("vms")(vms)
    app.add_typer(sites_app, name="sites")


def plugins_cmd(as_json: JsonOpt = False) -> None:
    """List installed plugins and whether each can work on this machine."""
    rows = plugins.list_plugins()
    if as_json:
        emit([r.__dict__ for r in rows])
        return
    t = table("plugin", "role", "distribution", "status")
    for r in rows:
        status = "[green]ok[/]" if r.ok else f"[red]unavailable[/]: {r.reason}"
        t.add_row(r.name, r.role, f"{r.distribution} {r.version}", status)
    out.print(t)


@sites_app.command("list")
def sites_list(as_json: JsonOpt = False) -> None:
    """List configured sites."""
    sites = config.load_sites(home())
    if as_json:
        emit([{"name": s.name, "plugin": s.plugin, "path": str(s.path)} for s in sites.values()])
        return
    t = table("site", "plugin", "file")
    for s in sites.values():
        t.add_row(s.name, s.plugin, str(s.path))
    out.print(t)


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
    for getter in (plugins.source_class, plugins.target_class):
        try:
            cls = getter(site.plugin)
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
    for key, tbl in tables:
        lines.append(f"\n[{key}]")
        lines += [f"{k!r} = {json.dumps(v)}".replace("'", '"') for k, v in tbl.items()]
    return "\n".join(lines) + "\n"


@sites_app.command("check")
def sites_check(name: str, as_json: JsonOpt = False) -> None:
    """Connect to a site and report what it offers."""
    site = config.get_site(name, home())
    facts: dict[str, list[str]] = {}
    absent: list[str] = []  # roles the plugin does not offer at all (a vault is no source)
    for role, getter in (("source", plugins.source_class), ("target", plugins.target_class)):
        try:
            cls = getter(site.plugin)
        except StandbyError as exc:
            facts[role] = [f"not available: {exc}"]
            if isinstance(exc, NotFound):
                absent.append(role)
            continue
        plugin = cls(site)
        try:
            facts[role] = plugin.check()
        except RoleNotConfigured as exc:
            if role == "source":
                raise
            facts[role] = [f"not usable as a target: {exc}"]
        finally:
            plugin.close()
    if len(absent) == 1:
        del facts[absent[0]]
    if as_json:
        emit({"site": name, "plugin": site.plugin, **facts})
        return
    for role, lines in facts.items():
        for line in lines:
            out.print(f"{name} ({role}): {line}")


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
    t = table("name", "id", "cpus", "memory", "firmware", "disks", "state")
    for v in found:
        disks = ", ".join(f"{d.name} {size_text(d.size)} {d.format}" for d in v.disks)
        t.add_row(
            v.name, v.id, str(v.cpus), f"{v.memory_mib} MiB", v.firmware.value, disks, v.power_state
        )
    out.print(t)
