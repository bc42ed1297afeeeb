"""Durable progress of a running cycle: what is done, and the manifest, per disk.

Progress never gets ahead of durable data: the done units and the manifest are copied under
the jobs' lock, the target is flushed, and only then are both written to `cycle_disks`.
"""

from __future__ import annotations

import threading

from standby.core.extents import Intervals, Manifest, normalize, pack, unpack
from standby.core.interfaces import ReplicaWriter
from standby.core.state import CycleDisk, State

from .planning import DiskJob, Progress


def save(
    state: State, cycle_id: int, writer: ReplicaWriter, jobs: list[DiskJob], lock: threading.Lock
) -> None:
    """Persist progress; only units whose writes the target has flushed count as done."""
    with lock:
        copies = [(j, bytes(j.done), bytes(j.manifest.data)) for j in jobs]
    writer.flush()
    with state.session() as s:
        for job, done, manifest in copies:
            done_ranges: Intervals = normalize(
                [*job.done_before, *(job.units[k] for k, f in enumerate(done) if f)]
            )
            row = s.get(CycleDisk, (cycle_id, job.name))
            if row is None:
                row = CycleDisk(cycle_id=cycle_id, disk=job.name)
                s.add(row)
            row.mode = job.mode
            row.size = job.size
            row.plan = pack(job.plan)
            row.done = pack(done_ranges)
            row.manifest = Manifest(job.size, manifest).to_blob()


def load(rows: list[CycleDisk]) -> dict[str, Progress]:
    """What an interrupted cycle left, per disk."""
    return {
        r.disk: (r.mode, unpack(r.plan), unpack(r.done), Manifest.from_blob(r.size, r.manifest))
        for r in rows
    }
