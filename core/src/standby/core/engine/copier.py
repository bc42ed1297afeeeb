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
from standby.core.interfaces import Buffer, ReplicaWriter, Snapshot, Source
from standby.core.model import Extent
from standby.core.state import State

from . import checkpoint
from .planning import UNIT, DiskJob
from .progress import Progress

CHECKPOINT_SECONDS = 2.0
_F = TypeVar("_F", bound=Callable[..., Any])


def retried(fn: _F) -> _F:
    """`fn` retried on TransientError with exponential backoff (4 attempts in all).

    The first attempt is a plain call: tenacity's bookkeeping (~15 us a call) is paid only
    when something failed."""
    again = retry(
        retry=retry_if_exception_type(TransientError),
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.4, max=5),
        reraise=True,
    )(fn)

    def call(*args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except TransientError:
            time.sleep(0.2)
            return again(*args, **kw)

    return cast(_F, call)


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


BATCH_UNITS = 32
"""Small units (an incremental cycle's scattered 64 KiB blocks) are handed to the workers up
to this many at a time, so that a thread hop is not paid per block."""


def batches(jobs: list[DiskJob]) -> list[tuple[DiskJob, int, int]]:
    """Tasks of consecutive units of one disk: at most UNIT bytes or BATCH_UNITS units each."""
    out: list[tuple[DiskJob, int, int]] = []
    for job in jobs:
        first, size = 0, 0
        for i, (start, end) in enumerate(job.units):
            if i > first and (size + end - start > UNIT or i - first >= BATCH_UNITS):
                out.append((job, first, i))
                first, size = i, 0
            size += end - start
        if job.units:
            out.append((job, first, len(job.units)))
    return out


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
        self._read_many = retried(source.read_many)
        self._write = retried(writer.write)
        self._write_many = retried(writer.write_many)
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
        """Keep 2 x workers tasks in flight; report progress; checkpoint every few seconds."""
        todo = iter(batches(jobs))
        pending: set[Future[int]] = set()
        last_checkpoint = time.monotonic()
        every = max(CHECKPOINT_SECONDS, self.writer.checkpoint_seconds)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="standby-copy") as pool:
            try:
                while True:
                    if self.cancel is not None and self.cancel.is_set():
                        raise Interrupted("stopped; the next run resumes this cycle")
                    while len(pending) < self.workers * 2:
                        nxt = next(todo, None)
                        if nxt is None:
                            break
                        pending.add(pool.submit(self._batch, *nxt))
                    if not pending:
                        return
                    finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        self.progress.advance(fut.result())
                    if time.monotonic() - last_checkpoint >= every:
                        self.checkpoint(jobs)
                        last_checkpoint = time.monotonic()
            except BaseException:
                for fut in pending:
                    fut.cancel()
                wait(pending)
                raise

    def _batch(self, job: DiskJob, first: int, last: int) -> int:
        """Copy units first..last of a disk; returns their length. Several small units are
        read with one `read_many` and written with one `write_many` (round trips overlap)."""
        if last - first == 1:
            return self._unit(job, first)
        if self.cancel is not None and self.cancel.is_set():
            return 0
        units = job.units[first:last]
        datas = self._read_many(self.snap, job.name, [Extent(s, e - s) for s, e in units])
        pieces: list[tuple[int, Buffer]] = []
        zeros: list[tuple[int, int]] = []
        found: list[tuple[int, list[tuple[int, bytes]], list[tuple[bool, int, int]]]] = []
        for index, (start, end), data in zip(range(first, last), units, datas, strict=True):
            view = self._checked(job, start, end, data)
            digests, runs = diff_runs(view, job, start, end)
            for is_zero, rs, re_ in runs:
                if is_zero:
                    zeros.append((rs, re_))
                else:
                    pieces.append((rs, view[rs - start : re_ - start]))
            found.append((index, digests, runs))
        written = sum(len(memoryview(p[1])) for p in pieces)
        self.throttle.consume(written)
        if pieces:
            self._write_many(job.name, pieces)
        for rs, re_ in zeros:
            self._zero(job.name, Extent(rs, re_ - rs))
        with self.lock:
            for index, digests, runs in found:
                self._done(job, index, digests, runs)
            self.stats.read += sum(e - s for s, e in units)
            self.stats.written += written
            self.stats.zeroed += sum(e - s for s, e in zeros)
            self.stats.units += len(units)
        return sum(e - s for s, e in units)

    def _checked(self, job: DiskJob, start: int, end: int, data: Buffer) -> memoryview:
        """The unit's bytes as a view; a short read is a transient failure."""
        view = memoryview(data)
        if len(view) != end - start:
            raise TransientError(
                f"short read on disk '{job.name}' at {start}: {len(view)} of {end - start}"
            )
        if job.reconcile:
            self._reconcile(job, start, end)
        return view

    def _done(
        self,
        job: DiskJob,
        index: int,
        digests: list[tuple[int, bytes]],
        runs: list[tuple[bool, int, int]],
    ) -> None:
        """A unit's writes are in: its digests, done flag and written ranges (under the lock)."""
        for idx, digest in digests:
            job.manifest.set(idx, digest)
        job.done[index] = 1
        job.written.extend((rs, re_) for _z, rs, re_ in runs)

    def _unit(self, job: DiskJob, index: int) -> int:
        """Copy one unit; returns its length (for progress)."""
        start, end = job.units[index]
        view = self._checked(
            job, start, end, self._read(self.snap, job.name, Extent(start, end - start))
        )
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
            self._done(job, index, digests, runs)
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
