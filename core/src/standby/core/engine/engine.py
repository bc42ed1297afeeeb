"""The engine's public API: protect, replicate, prune, unprotect, usage and cost.

The lifecycle (failover kinds, commit, re-protect, failback) and the plan runner are built on
this API; the engine never imports them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select

from standby.core.config import Policy
from standby.core.errors import Interrupted, StandbyError
from standby.core.interfaces import Source, Target
from standby.core.model import CostEstimate, Usage
from standby.core.state import Cycle, State

from . import protections, retention
from .context import Context
from .cycle import CycleRun
from .progress import Progress
from .report import CycleReport


class Engine(Context):
    """Runs protections and cycles against the state database and the plugins."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every plugin connection the engine opened."""
        self.sites.close()

    def use(self, site_name: str, plugin: Source | Target) -> None:
        """Hand the engine an already-connected plugin for a site (tests, embedding)."""
        self.sites.use(site_name, plugin)

    # ----------------------------------------------------------------- protections

    def protect(self, vm_key: str, source_site: str, target_site: str, policy: Policy) -> int:
        """Validate the VM against the target and record the protection; returns its id."""
        return protections.protect(self, vm_key, source_site, target_site, policy)

    def protect_all(
        self, source_site: str, target_site: str, policy: Policy
    ) -> list[tuple[str, int | None, str]]:
        """Protect every VM the source lists that is not protected yet (a whole VMM cloud)."""
        return protections.protect_all(self, source_site, target_site, policy)

    def unprotect(self, vm_key: str, keep_replicas: bool = False) -> int:
        """Stop protecting a VM; returns how many points it had."""
        return protections.unprotect(self, vm_key, keep_replicas)

    def usage(self, vm_key: str | None = None, site: str | None = None) -> dict[str, list[Usage]]:
        return protections.usage(self, vm_key, site)

    def cost(self, vm_key: str | None = None, site: str | None = None) -> list[CostEstimate]:
        return protections.cost(self, vm_key, site)

    # ----------------------------------------------------------------- cycles

    def replicate(
        self,
        vm_key: str,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        wait: bool | None = None,
        on_point: Callable[[CycleReport], None] | None = None,
    ) -> CycleReport:
        """Run one cycle for a protection under its lock (resuming an interrupted one).

        Setting `cancel` stops the copy at the next piece, after a checkpoint (Interrupted);
        `wait` overrides the engine's choice between waiting for the lock and Busy;
        `on_point` is told the report as soon as the point is visible, before the cycle's
        housekeeping (stale change tokens, retention)."""
        with self.state.session() as s:
            prot = self.state.protection(s, vm_key)
        with self.lock(prot, "replication", wait):
            try:
                return self.run_cycle(prot.id, progress, cancel, on_point)
            except Interrupted:
                raise
            except StandbyError as exc:
                self._cycle_failed(prot.id, prot.vm_name, exc)
                raise

    def run_cycle(
        self,
        protection_id: int,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        on_point: Callable[[CycleReport], None] | None = None,
        final: bool = False,
    ) -> CycleReport:
        """One cycle of a protection; the caller holds the VM's lock (see `lock`). `final`:
        a planned failover's last cycle, the source VM off."""
        return CycleRun(self, protection_id, progress, cancel, on_point, final).run()

    def _cycle_failed(self, protection_id: int, vm_name: str, exc: StandbyError) -> None:
        with self.state.session() as s:
            running = s.scalars(
                select(Cycle).where(Cycle.protection_id == protection_id, Cycle.status == "running")
            ).first()
            if running is not None:
                running.error = str(exc)
            self.state.log(s, "cycle-failed", f"{vm_name}: {exc}", protection_id, level="error")

    def prune(self, vm_key: str) -> list[int]:
        """Apply the policy's retention; returns the ids of the points dropped."""
        return retention.prune(self, vm_key)

    # ----------------------------------------------------------------- steps of long work

    def step_reporter(self, protection_id: int, failover_id: int) -> Callable[[str], None]:
        """A callback that records a failover step as an event and shows it as progress."""

        def step(message: str) -> None:
            self.progress.finish()
            self.progress.start(message, 0)
            with self.state.session() as s:
                self.state.log(
                    s, "failover-step", f"failover {failover_id}: {message}", protection_id
                )

        return step


def open_state(home: Path) -> State:
    """The state database of `home` (or `$STANDBY_DB_URL`)."""
    url = os.environ.get("STANDBY_DB_URL")
    return State(url) if url else State.at(home)


@contextmanager
def opened(home: Path, progress: Progress | None = None, **kw: Any) -> Iterator[Engine]:
    """An engine over the state in `home`, closing plugin connections at the end."""
    state = open_state(home)
    engine = Engine(state, home, progress, **kw)
    try:
        yield engine
    finally:
        engine.close()
        state.dispose()
