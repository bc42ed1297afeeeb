"""Time and text helpers of plan runs (every stored time is UTC)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def now() -> datetime:
    return datetime.now(UTC)


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def iso(dt: datetime | None) -> str | None:
    found = aware(dt)
    return found.isoformat() if found else None


def parse_time(value: object) -> datetime | None:
    """An ISO time from an action's result (naive means UTC), or None."""
    if isinstance(value, datetime):
        return aware(value)
    if not isinstance(value, str) or not value:
        return None
    try:
        return aware(datetime.fromisoformat(value))
    except ValueError:
        return None


def one_line(text: str) -> str:
    return " ".join(text.split())


def seconds_text(value: float | None) -> str:
    """`75.5` -> `1m15.5s`; None -> `-`."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, sec = divmod(value, 60)
    if minutes < 60:
        return f"{minutes:.0f}m{sec:04.1f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours:.0f}h{minutes:02.0f}m{sec:02.0f}s"


def lock_path(home: Path, run_id: int) -> Path:
    return home / "locks" / f"run-{run_id}.lock"


def jsonable(data: Any) -> dict[str, Any]:
    found = json.loads(json.dumps(data, default=str))
    return found if isinstance(found, dict) else {"value": found}
