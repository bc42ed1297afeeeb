"""What a cycle reads per disk: changed extents, or everything allocated + hash-compare.

A disk's plan is a list of byte ranges widened to the 64 KiB manifest grain, cut into pieces
(units) of at most `UNIT` bytes; the copy loop works unit by unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from standby.core.extents import (
    Intervals,
    Manifest,
    align_out,
    normalize,
    split,
    subtract,
    total,
    union,
)
from standby.core.interfaces import Snapshot, Source
from standby.core.model import PointInfo

UNIT = 4 << 20
"""Largest piece read and written at once; memory in flight is bounded by workers x 2 x UNIT."""

Progress = tuple[str, Intervals, Intervals, Manifest]
"""What an interrupted cycle left for a disk: mode, plan, done ranges, manifest."""


@dataclass
class DiskJob:
    """The state of one disk inside a running cycle."""

    name: str
    size: int
    mode: str
    """full (no base) | incremental (changed extents) | hashcompare (no usable token)."""
    plan: Intervals
    done_before: Intervals
    units: list[tuple[int, int]]
    manifest: Manifest
    done: bytearray
    written: list[tuple[int, int]] = field(default_factory=list)
    reconcile: bool = False
    """The base is a re-protect seed: blocks of unknown content are read back from the
    target and hashed (compare against the original disks) instead of being shipped blind."""


def plan_disk(
    source: Source,
    snap: Snapshot,
    disk: str,
    size: int,
    base: PointInfo | None,
    prev: dict[str, Manifest],
    progress: Progress | None,
    seeded: bool = False,
) -> DiskJob:
    """Decide what to read for one disk: changed extents, or all allocated + hash-compare."""
    extents = align_out(((e.offset, e.end) for e in source.changed_extents(snap, disk)), size)
    in_base = base is not None and disk in base.disks
    if snap.since.get(disk):
        mode = "incremental"
    elif in_base:
        mode = "hashcompare"
    else:
        mode = "full"
    if in_base:
        manifest = Manifest(prev[disk].size, prev[disk].data)
        manifest.resize(size)
        if mode == "hashcompare":
            # Blocks the replica holds but the source no longer has allocated must be zeroed.
            extents = union(extents, manifest.nonzero())
    else:
        manifest = Manifest(size)
    done_before: Intervals = []
    if progress is not None:
        _mode, old_plan, old_done, old_manifest = progress
        old_manifest.resize(size)
        manifest = old_manifest
        unfinished = subtract(old_plan, old_done)
        # What was in flight when the cycle stopped is unknown at the target: never skip it.
        manifest.invalidate(unfinished)
        done_before = subtract(old_done, extents)
        extents = union(unfinished, extents)
    units = split(extents, UNIT)
    return DiskJob(
        name=disk,
        size=size,
        mode=mode,
        plan=normalize([*extents, *done_before]),
        done_before=done_before,
        units=units,
        manifest=manifest,
        done=bytearray(len(units)),
        reconcile=seeded,
    )


def cycle_kind(jobs: list[DiskJob]) -> str:
    """full when every disk is read in full, incremental when change tracking served, else
    hashcompare (some disk had to be compared against the base)."""
    modes = {j.mode for j in jobs}
    if modes == {"full"}:
        return "full"
    if "incremental" in modes and modes <= {"incremental", "full"}:
        return "incremental"
    return "hashcompare"


def planned_bytes(jobs: list[DiskJob]) -> int:
    return sum(total(j.plan) for j in jobs)
