"""Cost estimates from an operator-maintained price table (no network lookups)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standby.core.errors import ConfigError
from standby.core.model import CostEstimate, CostLine, Usage
from standby.providers.azure.compute import boot_disk

GiB = 1 << 30
HOURS_PER_MONTH = 730
SAMPLE = Path(__file__).with_name("prices.sample.toml")


@dataclass(frozen=True)
class Prices:
    """A price table: storage per GB-month, managed-disk tiers, compute per hour."""

    path: Path
    currency: str
    as_of: str
    page_blob: float
    snapshot: float
    disks: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    compute: dict[str, float] = field(default_factory=dict)

    def hourly(self, size: str) -> float | None:
        lowered = {k.lower(): v for k, v in self.compute.items()}
        return lowered.get(size.lower())

    def disk_month(self, sku: str, size: int) -> float | None:
        gib = -(-size // GiB)
        for max_gib, price in self.disks.get(sku, []):
            if gib <= max_gib:
                return price
        return None


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
            page_blob=float(storage["page_blob_gb_month"]),
            snapshot=float(storage["snapshot_gb_month"]),
            disks={
                sku: sorted((int(k), float(v)) for k, v in tiers.items())
                for sku, tiers in data.get("managed_disk", {}).items()
            },
            compute={k: float(v) for k, v in data.get("compute", {}).items()},
        )
    except OSError as exc:
        raise ConfigError(f"price table {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"price table {p}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"price table {p}: missing or bad key {exc}") from None


def estimate(usage: list[Usage], prices: Prices, disk_sku: str) -> CostEstimate:
    """Monthly storage while protected, hourly compute and monthly disks after failover."""
    lines: list[CostLine] = []
    notes = [f"prices from {prices.path} (as of {prices.as_of}); estimates, not a bill"]
    for u in usage:
        name = u.protection.vm.name
        gb = u.replica_bytes / GiB
        lines.append(
            CostLine(
                name,
                "replica page blobs",
                round(gb, 3),
                "GB-month",
                prices.page_blob,
                gb * prices.page_blob,
            )
        )
        sgb = u.point_bytes / GiB
        lines.append(
            CostLine(
                name,
                f"recovery points ({u.points} snapshots)",
                round(sgb, 3),
                "GB-month",
                prices.snapshot,
                sgb * prices.snapshot,
            )
        )
        if u.size:
            rate = prices.hourly(u.size)
            if rate is None:
                notes.append(f"{name}: no price for VM size {u.size} in the table")
            else:
                lines.append(
                    CostLine(name, f"after failover: VM {u.size}", 1, "hour", rate, 0.0, rate)
                )
        vm = u.protection.vm
        if vm.disks:
            boot = boot_disk(vm)
            for d in vm.disks:
                month = prices.disk_month(disk_sku, d.size)
                if month is None:
                    notes.append(f"{name}: no {disk_sku} tier for disk {d.name}")
                    continue
                role = "OS" if d is boot else "data"
                lines.append(
                    CostLine(
                        name,
                        f"after failover: {role} disk {d.name} ({disk_sku})",
                        1,
                        "disk",
                        month,
                        0.0,
                        month / HOURS_PER_MONTH,
                    )
                )
    return CostEstimate(
        lines=lines, currency=prices.currency, prices_from=str(prices.path), notes=notes
    )
