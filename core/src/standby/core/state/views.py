"""Small queries and row -> contract conversions that the engine, lifecycle and CLI share."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.core.model import PointInfo, ProtectionInfo, VMSpec
from standby.core.state.db import Failover, Protection, RecoveryPoint

ACTIVE = ("starting", "running")
"""Failover states whose VM is (or may be) up at the target."""
UNCLEANED = (*ACTIVE, "failed")
"""Failover states that may have left something at the target for `cleanup`."""


def aware(t: datetime) -> datetime:
    """SQLite hands back naive datetimes; they are UTC."""
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def failovers(s: Session, protection_id: int, states: tuple[str, ...]) -> list[Failover]:
    """A protection's failovers in the given states, oldest first."""
    return list(
        s.scalars(
            select(Failover)
            .where(Failover.protection_id == protection_id, Failover.state.in_(states))
            .order_by(Failover.id)
        )
    )


def latest_point(s: Session, protection_id: int, with_seed: bool = False) -> RecoveryPoint | None:
    """The newest visible point (or, as a cycle's base, the re-protect seed before it)."""
    states = ("visible", "seed") if with_seed else ("visible",)
    return s.scalars(
        select(RecoveryPoint)
        .where(RecoveryPoint.protection_id == protection_id, RecoveryPoint.state.in_(states))
        .order_by(RecoveryPoint.id.desc())
    ).first()


def point_info(p: RecoveryPoint) -> PointInfo:
    """A point as handed to a target."""
    return PointInfo(
        id=p.id,
        created_at=aware(p.created_at),
        ref=dict(p.ref),
        disks={d.disk: d.size for d in p.disks},
    )


def protection_info(p: Protection, vm: VMSpec | None = None) -> ProtectionInfo:
    """A protection as handed to a target."""
    return ProtectionInfo(
        id=p.id,
        vm=vm or VMSpec.from_dict(p.spec),
        source_site=p.source_site,
        target_site=p.target_site,
    )
