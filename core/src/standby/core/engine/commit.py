"""Making a recovery point visible: one transaction after the target sealed it.

The transaction inserts the point with its per-disk manifests and digests, replaces the
change tokens, completes the cycle with its figures and the achieved RPO, and deletes the
cycle's progress rows. A point is visible only once it commits.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.core.errors import StandbyError
from standby.core.extents import BLOCK, Manifest
from standby.core.model import ProtectionInfo
from standby.core.state import (
    ChangeToken,
    Cycle,
    CycleDisk,
    PointDisk,
    Protection,
    RecoveryPoint,
    State,
    aware,
)

from .report import CycleReport


def point_meta(state: State, cycle_id: int) -> dict[str, Any]:
    """The engine's record of a point about to be sealed, for targets that store it."""
    with state.session() as s:
        c = s.get(Cycle, cycle_id)
        assert c is not None
        rows = s.scalars(select(CycleDisk).where(CycleDisk.cycle_id == cycle_id))
        return {
            "cycle": cycle_id,
            "taken_at": aware(c.snapshot_at).isoformat() if c.snapshot_at else None,
            "consistency": c.consistency,
            "block_size": BLOCK,
            "disks": {
                r.disk: {
                    "size": r.size,
                    "manifest_blake3": Manifest.from_blob(r.size, r.manifest).digest(),
                }
                for r in rows
            },
        }


def make_visible(
    state: State,
    cycle_id: int,
    pinfo: ProtectionInfo,
    ref: dict[str, Any],
    notes: list[str],
    started: float,
    resumed: bool,
) -> tuple[CycleReport, dict[str, str | None]]:
    """Insert the point of a sealed cycle; returns the report and the new change tokens."""
    now = datetime.now(UTC)
    with state.session() as s:
        c = s.get(Cycle, cycle_id)
        assert c is not None and c.snapshot_at is not None
        rows = {r.disk: r for r in s.scalars(select(CycleDisk).where(CycleDisk.cycle_id == c.id))}
        missing = [d.name for d in pinfo.vm.disks if d.name not in rows]
        if missing:
            raise StandbyError(f"cycle {c.id} has no progress for disk(s) {missing}")
        point = RecoveryPoint(
            protection_id=pinfo.id,
            cycle_id=c.id,
            created_at=aware(c.snapshot_at),
            consistency=c.consistency,
            ref=ref,
            notes="; ".join(notes),
        )
        s.add(point)
        s.flush()
        _add_disks(s, point, pinfo, rows)
        tokens = dict(c.snapshot_tokens or {})
        _replace_tokens(s, pinfo.id, tokens, point.id)
        for r in rows.values():
            s.delete(r)
        prev = s.get(RecoveryPoint, c.base_point_id) if c.base_point_id is not None else None
        rpo = (now - aware(prev.created_at)).total_seconds() if prev else None
        c.status, c.finished_at, c.rpo_seconds = "complete", now, rpo
        prot = s.get(Protection, pinfo.id)
        assert prot is not None
        prot.health, prot.health_reason = "ok", ""
        state.log(
            s,
            "point",
            f"{pinfo.vm.name}: recovery point {point.id} ({c.kind}, {c.consistency}"
            f"{', resumed' if c.resumed else ''}) "
            f"written {c.bytes_written} bytes",
            pinfo.id,
            cycle=c.id,
            point=point.id,
        )
        report = _report(c, point.id, pinfo, notes, started, resumed)
    return report, tokens


def _report(
    c: Cycle, point_id: int, pinfo: ProtectionInfo, notes: list[str], started: float, resumed: bool
) -> CycleReport:
    return CycleReport(
        vm=pinfo.vm.name,
        cycle_id=c.id,
        point_id=point_id,
        kind=c.kind,
        consistency=c.consistency,
        resumed=resumed or c.resumed > 0,
        bytes_planned=c.bytes_planned,
        bytes_read=c.bytes_read,
        bytes_written=c.bytes_written,
        bytes_zeroed=c.bytes_zeroed,
        seconds=time.monotonic() - started,
        rpo_seconds=c.rpo_seconds,
        notes=list(notes),
    )


def _add_disks(
    s: Session, point: RecoveryPoint, pinfo: ProtectionInfo, rows: dict[str, CycleDisk]
) -> None:
    """The point's per-disk manifests; a block of unknown content refuses the point."""
    for disk in pinfo.vm.disks:
        row = rows[disk.name]
        manifest = Manifest.from_blob(row.size, row.manifest)
        if manifest.has_unknown():
            raise StandbyError(f"disk '{disk.name}' has blocks of unknown content; point not made")
        s.add(
            PointDisk(
                point_id=point.id,
                disk=disk.name,
                size=row.size,
                block_size=BLOCK,
                manifest=row.manifest,
                digest=manifest.digest(),
            )
        )


def _replace_tokens(
    s: Session, protection_id: int, tokens: dict[str, str | None], point_id: int
) -> None:
    for t in s.scalars(select(ChangeToken).where(ChangeToken.protection_id == protection_id)):
        s.delete(t)
    s.flush()
    for disk_name, token in tokens.items():
        s.add(
            ChangeToken(protection_id=protection_id, disk=disk_name, token=token, point_id=point_id)
        )
