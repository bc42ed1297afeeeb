"""`standby failover VM --test|--planned|--unplanned`, `failover cleanup VM`, `commit`,
`reprotect` and `failback`: the lifecycle of one VM."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from typing import TYPE_CHECKING, Annotated, Any

import typer

from standby.core.errors import ConfigError

from .common import BarProgress, JsonOpt, emit, home, out

if TYPE_CHECKING:
    from standby.core.lifecycle import Lifecycle


def register(app: typer.Typer) -> None:
    app.command("failover")(failover)
    app.command("commit")(commit)
    app.command("reprotect")(reprotect)
    app.command("failback")(failback)


@contextmanager
def _lifecycle() -> Iterator[Lifecycle]:
    from standby.core.engine import opened
    from standby.core.lifecycle import Lifecycle

    with opened(home(), BarProgress()) as engine:
        yield Lifecycle(engine)


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
    if vm_or_action == "cleanup":
        if not vm:
            raise ConfigError("usage: standby failover cleanup VM")
        with _lifecycle() as life:
            ids = life.cleanup(vm)
        if as_json:
            emit({"vm": vm, "cleaned": ids})
        else:
            out.print(f"{vm}: test failover cleaned up (everything it created is removed)")
        return
    if vm is not None:
        raise ConfigError(f"unexpected argument '{vm}'")
    kinds = [k for k, on in (("test", test), ("planned", planned), ("unplanned", unplanned)) if on]
    if len(kinds) != 1:
        raise ConfigError("choose one of --test, --planned, --unplanned")
    if planned and point is not None:
        raise ConfigError("a planned failover uses the final point; --point is not allowed")
    with _lifecycle() as life:
        fo = life.failover(vm_or_action, kind=kinds[0], point_id=point)
        data = failover_data(vm_or_action, fo)
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


def failover_data(vm: str, fo: Any) -> dict[str, Any]:
    """A failover row as JSON."""
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


def commit(vm: str, as_json: JsonOpt = False) -> None:
    """Finish a failover: earlier recovery points can no longer be chosen, and are freed."""
    with _lifecycle() as life:
        fo = life.commit(vm)
    if as_json:
        emit(failover_data(vm, fo))
    else:
        out.print(f"{vm}: failover {fo.id} committed; next: `standby reprotect {vm}`")


def reprotect(vm: str, as_json: JsonOpt = False) -> None:
    """Replicate a failed-over (committed) VM back to the site it came from."""
    with _lifecycle() as life:
        prot = life.reprotect(vm)
    data = {"vm": vm, "source": prot.source_site, "target": prot.target_site}
    if as_json:
        emit(data)
    else:
        out.print(
            f"{vm}: re-protected {prot.source_site} -> {prot.target_site}; run "
            f"`standby replicate {vm}` (it compares against the disks already there)"
        )


def failback(vm: str, as_json: JsonOpt = False) -> None:
    """Planned failover back to the VM's home site (after re-protect has caught up)."""
    with _lifecycle() as life:
        fo = life.failback(vm)
        data = failover_data(vm, fo)
    if as_json:
        emit(data)
    else:
        out.print(
            f"{vm}: failed back, [bold]{fo.vm_name}[/] running at home from point "
            f"{fo.point_id} (zero data loss); next: `standby commit {vm}` and "
            f"`standby reprotect {vm}`"
        )
