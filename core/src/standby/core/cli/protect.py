"""`standby protect VM --from SITE --to SITE` and `standby unprotect VM`."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from standby.core import config
from standby.core.errors import CapabilityNotSupported, ConfigError

from .common import JsonOpt, emit, home, out


def register(app: typer.Typer) -> None:
    app.command("protect")(protect)
    app.command("unprotect")(unprotect)


def protect(
    vm: Annotated[str | None, typer.Argument(help="The VM (name or id); or --all.")] = None,
    source: Annotated[str, typer.Option("--from", help="Source site.")] = "",
    target: Annotated[str, typer.Option("--to", help="Target (DR) site.")] = "",
    every: Annotated[
        bool,
        typer.Option("--all", help="Every VM the source site lists (a whole VMM cloud)."),
    ] = False,
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
    """Protect a VM (or --all of a site's VMs): validate against the target and record."""
    from standby.core.engine import opened

    if not source or not target:
        raise ConfigError("protect needs --from SITE and --to SITE")
    if (vm is None) == (not every):
        raise ConfigError("protect takes one VM, or --all (not both)")

    overrides = _overrides(rpo, retain, retain_age, app_consistent_every, bandwidth_mbps)
    base = config.load_policy(policy, home())
    pol = base.model_copy(update=overrides).checked("policy")
    if every:
        _protect_all(source, target, pol, as_json)
        return
    assert vm is not None
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


def _overrides(
    rpo: str | None,
    retain: int | None,
    retain_age: str | None,
    app_consistent_every: str | None,
    bandwidth_mbps: float | None,
) -> dict[str, Any]:
    """The policy keys given on the command line."""
    out: dict[str, Any] = {}
    if rpo is not None:
        out["rpo_seconds"] = config.parse_duration(rpo, "--rpo")
    if retain is not None:
        out["retain_count"] = retain
    if retain_age is not None:
        out["retain_age_seconds"] = config.parse_duration(retain_age, "--retain-age")
    if app_consistent_every is not None:
        out["app_consistent_every_seconds"] = config.parse_duration(
            app_consistent_every, "--app-consistent-every"
        )
    if bandwidth_mbps is not None:
        out["bandwidth_mbps"] = bandwidth_mbps
    return out


def _protect_all(source: str, target: str, pol: config.Policy, as_json: bool) -> None:
    from standby.core.engine import opened

    with opened(home()) as engine:
        results = engine.protect_all(source, target, pol)
    refused = [r for r in results if r[1] is None and r[2] != "already protected"]
    if as_json:
        emit([{"vm": v, "protection": pid, "result": what} for v, pid, what in results])
    else:
        for v, pid, what in results:
            mark = f"protection {pid}" if pid is not None else what
            out.print(f"{v}: {mark}")
        new = sum(1 for r in results if r[1] is not None)
        out.print(
            f"{source}: {new} protected, {len(results) - new - len(refused)} already protected, "
            f"{len(refused)} refused"
        )
    if refused:
        raise typer.Exit(code=CapabilityNotSupported.exit_code)


def unprotect(
    vm: str,
    keep_replicas: Annotated[
        bool, typer.Option(help="Leave the replica files at the target (state is dropped).")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Stop protecting a VM and remove its recovery points at the target."""
    from standby.core.engine import opened

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
