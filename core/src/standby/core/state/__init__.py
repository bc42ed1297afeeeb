"""Persistent state: SQLAlchemy models over SQLite (default) or PostgreSQL, Alembic migrations."""

from __future__ import annotations

from standby.core.state.db import (
    Base,
    ChangeToken,
    Cycle,
    CycleDisk,
    Event,
    Failover,
    PlanRun,
    PointDisk,
    Protection,
    RecoveryPoint,
    RunStep,
    SiteRecord,
    State,
)

__all__ = [
    "Base",
    "ChangeToken",
    "Cycle",
    "CycleDisk",
    "Event",
    "Failover",
    "PlanRun",
    "PointDisk",
    "Protection",
    "RecoveryPoint",
    "RunStep",
    "SiteRecord",
    "State",
]
