"""Cost estimates for AWS from an operator-maintained price table (no network lookups)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standby.core.errors import ConfigError
from standby.core.model import CostEstimate, CostLine, Usage

GiB = 1 << 30
HOURS_PER_MONTH = 730
SAMPLE = Path(__file__).with_name("prices.sample.toml")


@dataclass(frozen=True)
class Prices:
    """Snapshot and gp3 storage per GB-month, instance types per hour."""

    path: Path
    currency: str
    as_of: str
    snapshot: float
    gp3: float
    compute: dict[str, float] = field(default_factory=dict)

    def hourly(self, itype: str) -> float | None:
        return self.compute.get(itype)


def load_prices(path: str | Path | None) -> Prices:
    """Read a price table (the shipped sample when no path is given); one-line errors."""
    p = Path(path).expanduser() if path else SAMPLE
    try:
        data: dict[str, Any] = tomllib.loads(p.read_text())
        storage = data["storage"]
        return Prices(
            path=p,
            currency=str(data.get("currency", "USD")),
            as_of=str(data.get("as_of", "unknown date")),
            snapshot=float(storage["snapshot_gb_month"]),
            gp3=float(storage["gp3_gb_month"]),
            compute={k: float(v) for k, v in data.get("compute", {}).items()},
        )
    except OSError as exc:
        raise ConfigError(f"price table {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"price table {p}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"price table {p}: missing or bad key {exc}") from None


def estimate(usage: list[Usage], prices: Prices) -> CostEstimate:
    """Monthly snapshot storage while protected; instance and gp3 volumes after failover."""
    lines: list[CostLine] = []
    notes = [f"prices from {prices.path} (as of {prices.as_of}); estimates, not a bill"]
    for u in usage:
        name = u.protection.vm.name
        gb = (u.replica_bytes + u.point_bytes) / GiB
        lines.append(
            CostLine(
                name,
                f"EBS snapshots ({u.points} point(s))",
                round(gb, 3),
                "GB-month",
                prices.snapshot,
                gb * prices.snapshot,
            )
        )
        if u.size:
            rate = prices.hourly(u.size)
            if rate is None:
                notes.append(f"{name}: no price for instance type {u.size} in the table")
            else:
                lines.append(
                    CostLine(name, f"after failover: instance {u.size}", 1, "hour", rate, 0.0, rate)
                )
        vol_gb = sum(max(1, -(-d.size // GiB)) for d in u.protection.vm.disks)
        if vol_gb:
            month = vol_gb * prices.gp3
            lines.append(
                CostLine(
                    name,
                    f"after failover: gp3 volumes ({vol_gb} GiB)",
                    vol_gb,
                    "GB-month",
                    prices.gp3,
                    0.0,
                    month / HOURS_PER_MONTH,
                )
            )
    return CostEstimate(
        lines=lines, currency=prices.currency, prices_from=str(prices.path), notes=notes
    )
