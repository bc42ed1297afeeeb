"""The copy loop: read -> checksum -> write changed blocks, bounded threads and memory.

Each unit (a piece of at most 4 MiB) is read from the snapshot, hashed per 64 KiB block and
compared with the manifest; only blocks that differ are written (all-zero runs become
`write_zeroes`). At most 2 x workers units are in flight. Progress is checkpointed every
`CHECKPOINT_SECONDS` and on any error (see `checkpoint.save`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from standby.core.errors import Interrupted, TransientError
from standby.core.extents import BLOCK, UNKNOWN_DIGEST, ZERO_DIGEST, block_digest, total
from standby.core.interfaces import ReplicaWriter, Snapshot, Source
from standby.core.model import Extent
from standby.core.state import State

from . import checkpoint
from .planning import DiskJob
from .progress import Progress

CHECKPOINT_SECONDS = 2.0
_F = TypeVar("_F", bound=Callable[..., Any])


def retried(fn: _F) -> _F:
    """`fn` retried on TransientError with exponential backoff (4 attempts)."""
    wrapped = retry(
        retry=retry_if_exception_type(TransientError),
        stop=stop_after_attempt(4),
        wait=wait_exponential(multiplier=0.2, max=5),
        reraise=True,
    )(fn)
    return cast(_F, wrapped)


class Throttle:
    """A shared token bucket for the policy's bandwidth limit (bytes per second)."""

    def __init__(self, mbps: float) -> None:
        self.rate = mbps * 1_000_000 / 8 if mbps > 0 else 0.0
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def consume(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
        delay = start - now
        if delay > 0:
            time.sleep(delay)


@dataclass
class CopyStats:
    """Bytes read from the source, written and zeroed at the target, by this run."""

    read: int = 0
    written: int = 0
    zeroed: int = 0
    units: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def diff_runs(
    view: memoryview, job: DiskJob, start: int, end: int
) -> tuple[list[tuple[int, bytes]], list[tuple[bool, int, int]]]:
    """Blocks of `view` (the unit [start, end)) that differ from the manifest.

    Returns their new digests and the runs to write: (is_zero, start, end), adjacent blocks
    of the same kind joined."""
    digests: list[tuple[int, bytes]] = []
    runs: list[tuple[bool, int, int]] = []
    for off in range(start, end, BLOCK):
        blk = view[off - start : min(end, off + BLOCK) - start]
        digest = block_digest(blk)
        idx = off // BLOCK
        if digest == job.manifest.get(idx):
            continue
        digests.append((idx, digest))
        is_zero = digest == ZERO_DIGEST
        blk_end = off + len(blk)
        if runs and runs[-1][0] == is_zero and runs[-1][2] == off:
            runs[-1] = (is_zero, runs[-1][1], blk_end)
        else:
            runs.append((is_zero, off, blk_end))
    return digests, runs


class Copier:
    """Copies the planned units of a cycle's disks from a snapshot into a replica writer."""

    def __init__(
        self,
        state: State,
        cycle_id: int,
        source: Source,
        snap: Snapshot,
        writer: ReplicaWriter,
        *,
        workers: int,
        throttle: Throttle,
        progress: Progress,
        cancel: threading.Event | None = None,
    ) -> None:
        self.state = state
        self.cycle_id = cycle_id
        self.snap = snap
        self.writer = writer
        self.workers = workers
        self.throttle = throttle
        self.progress = progress
        self.cancel = cancel
        self.lock = threading.Lock()
        self.stats = CopyStats(lock=self.lock)
        self._read = retried(source.read)
        self._write = retried(writer.write)
        self._zero = retried(writer.write_zeroes)

    def run(self, vm_name: str, jobs: list[DiskJob]) -> CopyStats:
        """Copy every unit of `jobs`; checkpoints as it goes and on the way out of an error."""
        self.progress.start(f"{vm_name}: copying", sum(total(j.plan) for j in jobs))
        self.progress.advance(sum(total(j.done_before) for j in jobs))
        try:
            self._pump(jobs)
        except BaseException:
            try:
                self.checkpoint(jobs)
            except Exception:  # the original error matters more
                pass
            raise
        finally:
            self.progress.finish()
        self.checkpoint(jobs)
        return self.stats

    def checkpoint(self, jobs: list[DiskJob]) -> None:
        checkpoint.save(self.state, self.cycle_id, self.writer, jobs, self.lock)

    def _pump(self, jobs: list[DiskJob]) -> None:
        """Keep 2 x workers units in flight; report progress; checkpoint every few seconds."""
        todo = iter([(j, i) for j in jobs for i in range(len(j.units))])
        pending: set[Future[int]] = set()
        last_checkpoint = time.monotonic()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="standby-copy") as pool:
            try:
                while True:
                    if self.cancel is not None and self.cancel.is_set():
                        raise Interrupted("stopped; the next run resumes this cycle")
                    while len(pending) < self.workers * 2:
                        nxt = next(todo, None)
                        if nxt is None:
                            break
                        pending.add(pool.submit(self._unit, *nxt))
                    if not pending:
                        return
                    finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        self.progress.advance(fut.result())
                    if time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS:
                        self.checkpoint(jobs)
                        last_checkpoint = time.monotonic()
            except BaseException:
                for fut in pending:
                    fut.cancel()
                wait(pending)
                raise

    def _unit(self, job: DiskJob, index: int) -> int:
        """Copy one unit; returns its length (for progress)."""
        start, end = job.units[index]
        data = self._read(self.snap, job.name, Extent(start, end - start))
        if len(data) != end - start:
            raise TransientError(
                f"short read on disk '{job.name}' at {start}: {len(data)} of {end - start}"
            )
        view = memoryview(data)
        if job.reconcile:
            self._reconcile(job, start, end)
        digests, runs = diff_runs(view, job, start, end)
        written = zeroed = 0
        for is_zero, rs, re_ in runs:
            if is_zero:
                self._zero(job.name, Extent(rs, re_ - rs))
                zeroed += re_ - rs
            else:
                self.throttle.consume(re_ - rs)
                self._write(job.name, rs, view[rs - start : re_ - start])
                written += re_ - rs
        with self.lock:
            for idx, digest in digests:
                job.manifest.set(idx, digest)
            job.done[index] = 1
            job.written.extend((rs, re_) for _z, rs, re_ in runs)
            self.stats.read += end - start
            self.stats.written += written
            self.stats.zeroed += zeroed
            self.stats.units += 1
        return end - start

    def _reconcile(self, job: DiskJob, start: int, end: int) -> None:
        """Learn what the target holds where the seed manifest does not know (one read)."""
        first, last = start // BLOCK, -(-end // BLOCK)
        if all(job.manifest.get(i) != UNKNOWN_DIGEST for i in range(first, last)):
            return
        held = memoryview(self.writer.read(job.name, Extent(start, end - start)))
        for i in range(first, last):
            if job.manifest.get(i) == UNKNOWN_DIGEST:
                lo = i * BLOCK - start
                job.manifest.set(i, block_digest(held[lo : min(end - start, lo + BLOCK)]))
