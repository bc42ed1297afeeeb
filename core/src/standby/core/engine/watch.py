"""`replicate --watch`: keep every protection within its RPO, VMs in parallel.

A protection is due when its newest point is older than half its RPO target (or it has no
point yet). The watcher runs due cycles on a pool of `parallel` threads, at most one cycle
per VM at a time, most overdue first, so a slow VM holds one slot and never starves the
others. It wakes when a cycle ends or when the next protection becomes due (at the latest
every `interval` seconds, to notice new protections). A VM whose cycle failed waits before
its next attempt (5 s, doubling up to 5 min) so that it cannot hog a slot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from sqlalchemy import select

from standby.core.config import Policy
from standby.core.errors import Interrupted, StandbyError
from standby.core.state import Protection, aware, latest_point

from .control import ControlServer
from .engine import Engine
from .progress import NullProgress
from .report import CycleReport

BACKOFF_FIRST, BACKOFF_MAX = 5.0, 300.0


@dataclass(frozen=True)
class Due:
    """When a protection's next cycle should start (wall-clock seconds since the epoch)."""

    vm: str
    at: float


def schedule(engine: Engine, only: str | None = None) -> list[Due]:
    """Every replicating protection and when it is due, soonest first."""
    out: list[Due] = []
    with engine.state.session() as s:
        for prot in s.scalars(select(Protection).order_by(Protection.id)):
            if prot.state != "protected" or prot.health == "source-missing":
                continue
            if only is not None and only not in (prot.vm_name, prot.vm_id):
                continue
            policy = Policy.model_validate(prot.policy)
            latest = latest_point(s, prot.id)
            at = 0.0 if latest is None else aware(latest.created_at).timestamp()
            out.append(Due(prot.vm_name, at + policy.rpo_seconds / 2 if latest else 0.0))
    return sorted(out, key=lambda d: d.at)


class Watcher:
    """Runs cycles as RPO targets need, in parallel across VMs, until `stop` is set."""

    def __init__(
        self,
        engine: Engine,
        *,
        parallel: int = 4,
        interval: float = 10.0,
        on_report: Callable[[CycleReport], None] = lambda _r: None,
        on_error: Callable[[str, StandbyError], None] = lambda _vm, _e: None,
        only: str | None = None,
        serve: bool = False,
    ) -> None:
        self.engine = engine
        self.parallel = max(1, parallel)
        self.interval = interval
        self.on_report = on_report
        self.on_error = on_error
        self.only = only
        self.stop = threading.Event()
        self.asked = False  # set by ask_stop(), from a signal handler
        self.server = ControlServer(engine.home, self.replicate_now) if serve else None
        self._busy: set[str] = set()  # VMs this service is cycling (scheduled or asked)
        self._idle = threading.Condition()
        self._running: dict[str, Future[CycleReport]] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # vm -> (count, retry at)

    def ask_stop(self) -> None:
        """Stop soon (within a second); safe in a signal handler: it takes no lock, where
        raising there (KeyboardInterrupt) could leave a future's or an event's lock held."""
        self.asked = True

    def run(self) -> None:
        """Loop until `stop` is set; cycles in flight finish (or are interrupted) on exit."""
        if self.server is not None:
            self.server.start()
        with ThreadPoolExecutor(self.parallel, thread_name_prefix="standby-watch") as pool:
            try:
                while not self.stop.is_set() and not self.asked:
                    self._collect()
                    wake = self._start_due(pool)
                    self._sleep(wake)
            finally:
                self.stop.set()
                if self.server is not None:
                    self.server.stop()
                wait(list(self._running.values()))
                self._collect()

    def replicate_now(
        self, vm: str, wait_for_lock: bool, on_point: Callable[[CycleReport], None]
    ) -> CycleReport:
        """A cycle asked for through the control socket. When this service is cycling the VM
        already (a scheduled cycle, or an earlier request still in its housekeeping), the ask
        waits for that cycle and then runs its own; only another process holding the VM's
        lock answers Busy (unless `wait_for_lock`). The scheduler leaves the VM alone
        meanwhile. `on_point` answers the asker as soon as the point is visible."""

        def made(report: CycleReport) -> None:
            on_point(report)
            self.on_report(report)

        with self._idle:
            while vm in self._busy:
                if self.stop.is_set():
                    raise Interrupted("the service is stopping")
                self._idle.wait(0.5)
            self._busy.add(vm)
        return self._cycle(vm, wait_for_lock, made)

    def _cycle(
        self,
        vm: str,
        wait_for_lock: bool | None = None,
        on_point: Callable[[CycleReport], None] | None = None,
    ) -> CycleReport:
        """One cycle of a VM already marked busy; unmarks it when the cycle is over."""
        try:
            return self.engine.replicate(vm, NullProgress(), self.stop, wait_for_lock, on_point)
        finally:
            with self._idle:
                self._busy.discard(vm)
                self._idle.notify_all()

    def _start_due(self, pool: ThreadPoolExecutor) -> float:
        """Start due cycles while slots are free; returns when to look again."""
        now = time.time()
        wake = now + self.interval
        for due in schedule(self.engine, self.only):
            at = max(due.at, self._failures.get(due.vm, (0, 0.0))[1])
            if at > now:
                wake = min(wake, at)
                continue
            if len(self._running) >= self.parallel:
                break
            with self._idle:
                if due.vm in self._busy:
                    continue
                self._busy.add(due.vm)
            self._running[due.vm] = pool.submit(self._cycle, due.vm)
        return wake

    def _sleep(self, until: float) -> None:
        """Until `until`, a cycle ends, or `stop` is set."""
        left = until - time.time()
        if left <= 0 or self.asked:
            return
        if self._running:
            wait(list(self._running.values()), timeout=min(left, 1.0), return_when=FIRST_COMPLETED)
        else:
            self.stop.wait(min(left, 1.0))

    def _collect(self) -> None:
        """Report finished cycles; a failure backs its VM off."""
        for vm, fut in list(self._running.items()):
            if not fut.done():
                continue
            del self._running[vm]
            exc = fut.exception()
            if exc is None:
                self._failures.pop(vm, None)
                self.on_report(fut.result())
            elif isinstance(exc, Interrupted):
                pass  # stopping: the cycle checkpointed and resumes next time
            elif isinstance(exc, StandbyError):
                count = self._failures.get(vm, (0, 0.0))[0] + 1
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (count - 1))
                self._failures[vm] = (count, time.time() + delay)
                self.on_error(vm, exc)
            else:
                raise exc
