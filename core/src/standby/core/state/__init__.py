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
from standby.core.state.views import (
    ACTIVE,
    UNCLEANED,
    aware,
    failovers,
    latest_point,
    point_info,
    protection_info,
)

__all__ = [
    "ACTIVE",
    "UNCLEANED",
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
    "aware",
    "failovers",
    "latest_point",
    "point_info",
    "protection_info",
]
