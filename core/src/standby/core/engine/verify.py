"""Verification before a point is made: read back what the cycle wrote, compare checksums.

Levels (policy `verify`):
- `full`: every written byte is read back through the target and compared with the manifest
  that goes into the point. Proves the replica reads back as the manifest says.
- `sample`: `SAMPLE_UNITS` pieces of 4 MiB per disk, chosen at random per cycle, are read
  back. Proves the write path works end to end for this cycle (wrong offsets, lost or
  truncated writes, the wrong file), not that every block landed.
- `proof`: what `auto` means on a target that proves writes another way
  (`TargetCapabilities.write_proof`: Azure checks each Put Page against its Content-MD5;
  the physical target's fresh overlay shows exactly which blocks it holds). The target
  names what it cannot prove (`ReplicaWriter.unproven`); that is read back in full, and a
  sample of the rest is read back too, so the content path is checked every cycle.
- `auto` (the default): `proof` on such a target, else `full`.
- `none`: nothing is read back; the point's notes say so.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

from standby.core.config import Policy
from standby.core.errors import TransientError
from standby.core.extents import (
    BLOCK,
    Intervals,
    block_digest,
    normalize,
    split,
    subtract,
    total,
    union,
)
from standby.core.interfaces import ReplicaWriter, Target
from standby.core.model import Extent
from standby.core.state import State

from . import checkpoint
from .planning import UNIT, DiskJob

SAMPLE_UNITS = 16
"""Units (of UNIT bytes) per disk a sampled verification reads back."""


def verify_mode(policy: Policy, target: Target) -> str:
    """What `verify` means for this target: auto = full, or sample when writes are proven."""
    if policy.verify != "auto":
        return policy.verify
    return "proof" if target.capabilities.write_proof else "full"


def _plan(
    writer: ReplicaWriter, jobs: list[DiskJob], mode: str, cycle_id: int
) -> list[tuple[DiskJob, int, int]]:
    """The pieces to read back: every written piece, or a random sample per disk plus (with
    `proof`) whatever the target cannot prove it holds."""
    work: list[tuple[DiskJob, int, int]] = []
    for job in jobs:
        written = normalize(job.written)
        ranges = split(written, UNIT)
        if mode in ("sample", "proof") and ranges:
            rng = random.Random(cycle_id)
            ranges = rng.sample(ranges, max(1, min(len(ranges), SAMPLE_UNITS)))
            if mode == "proof":
                doubt = writer.unproven(job.name, written, job.plan)
                ranges = split(union(normalize(ranges), doubt), UNIT)
            ranges = sorted(ranges)
        work += [(job, start, end) for start, end in ranges]
    return work


def verify(
    state: State,
    cycle_id: int,
    writer: ReplicaWriter,
    jobs: list[DiskJob],
    mode: str,
    *,
    proof: str = "",
    workers: int = 4,
) -> str:
    """Read back what this cycle wrote and compare with the manifest before any commit.

    Returns a note for the point when less than everything was read back. A mismatch marks
    those blocks unknown, checkpoints (so the next cycle rewrites them) and raises."""
    written = sum(total(normalize(j.written)) for j in jobs)
    if mode == "none":
        how = f"; every write {proof}" if proof else ""
        return f"verify: none (policy), {written} written bytes not read back{how}"
    how = f"every write {proof}, " if proof else ""
    work = _plan(writer, jobs, mode, cycle_id)

    def check(item: tuple[DiskJob, int, int]) -> list[tuple[str, int, int]]:
        job, start, end = item
        data = memoryview(writer.read(job.name, Extent(start, end - start)))
        wrong = []
        for off in range(start, end, BLOCK):
            blk = data[off - start : min(end, off + BLOCK) - start]
            if block_digest(blk) != job.manifest.get(off // BLOCK):
                wrong.append((job.name, off, off + len(blk)))
        return wrong

    bad: dict[str, Intervals] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for wrong in pool.map(check, work):
            for name, off, end in wrong:
                bad.setdefault(name, []).append((off, end))
    if bad:
        _forget(state, cycle_id, writer, jobs, bad)
    if mode == "full" or not written:
        return ""
    sampled = sum(end - start for _, start, end in work)
    return f"verify: {how}{sampled} of {written} written bytes read back and compared"


def _forget(
    state: State,
    cycle_id: int,
    writer: ReplicaWriter,
    jobs: list[DiskJob],
    bad: dict[str, Intervals],
) -> None:
    """Blocks that read back wrong become unknown, not done, and part of the plan (a stray
    write may lie outside it), so the resumed cycle reads them again; then fail the cycle."""
    for job in jobs:
        if job.name in bad:
            ranges = normalize(bad[job.name])
            job.manifest.invalidate(ranges)
            job.plan = union(job.plan, ranges)
            for k, unit in enumerate(job.units):
                if subtract([unit], ranges) != [unit]:
                    job.done[k] = 0
            job.done_before = subtract(job.done_before, ranges)
    checkpoint.save(state, cycle_id, writer, jobs, threading.Lock())
    names = ", ".join(f"{d} ({total(r)} bytes)" for d, r in bad.items())
    raise TransientError(
        f"verification failed on {names}; no point was made, the next cycle rewrites them"
    )
