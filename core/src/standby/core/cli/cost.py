"""`standby cost [VM] [--site SITE]`: storage per month, compute per hour after failover."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from standby.core.errors import ConfigError, NotFound
from standby.core.model import CostEstimate

from .common import JsonOpt, emit, home, out, table


def register(app: typer.Typer) -> None:
    app.command("cost")(cost)


def _money(x: float) -> str:
    return f"{x:.2f}" if x >= 1 else f"{x:.4f}"


def cost(
    vm: Annotated[str | None, typer.Argument(help="A protected VM (default: all).")] = None,
    site: Annotated[str | None, typer.Option(help="Only protections to this target site.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Estimated monthly storage cost of replicas and points, and hourly cost after failover."""
    from standby.core.engine import opened

    if vm and site:
        raise ConfigError("give a VM or --site, not both")
    with opened(home()) as engine:
        estimates = engine.cost(vm, site)
    if not estimates:
        raise NotFound("no protection to estimate" + (f" at site '{site}'" if site else ""))
    if as_json:
        emit([_json(e) for e in estimates])
        return
    for e in estimates:
        t = table("VM", "item", "quantity", f"price ({e.currency})", "per month", "per hour")
        for line in e.lines:
            t.add_row(
                line.protection,
                line.item,
                f"{line.quantity:g} {line.unit}",
                f"{line.unit_price:.4f}",
                _money(line.monthly) if line.monthly else "",
                f"{line.hourly:.4f}" if line.hourly else "",
            )
        out.print(t)
        out.print(
            f"while protected: [bold]{_money(e.monthly)} {e.currency}/month[/]; after failover: "
            f"[bold]{e.hourly:.4f} {e.currency}/hour[/] more"
        )
        for note in e.notes:
            out.print(f"note: {note}", highlight=False)


def _json(e: CostEstimate) -> dict[str, object]:
    return {
        "currency": e.currency,
        "prices_from": e.prices_from,
        "monthly_storage": round(e.monthly, 4),
        "hourly_after_failover": round(e.hourly, 4),
        "lines": [asdict(line) for line in e.lines],
        "notes": e.notes,
    }
