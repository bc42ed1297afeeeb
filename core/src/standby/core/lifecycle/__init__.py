"""The failover lifecycle: test, planned and unplanned failover, commit, re-protect, failback.

A protection moves through `protected` -> (planned/unplanned failover) `failed-over` ->
(`commit`) `committed` -> (`reprotect`: the direction swaps, generation + 1) `protected` ->
(`failback` = a planned failover home) `failed-over` -> `committed` -> `reprotect` ... Test
failovers leave the state alone. Built on the engine's public API (`standby.core.engine`).

Modules: `failover` (start, cleanup), `planned` (final cycle, proof of no change),
`commit`, `reprotect` (with the seed), `failback`, `actions` (for plan runs).
"""

from __future__ import annotations

from standby.core.engine import Engine
from standby.core.state import Failover, Protection

from . import commit as _commit
from . import failback as _failback
from . import failover as _failover
from . import reprotect as _reprotect
from .actions import PlanActions
from .failover import KINDS


class Lifecycle:
    """The lifecycle operations on one engine (what the CLI and tests call)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def failover(
        self,
        vm_key: str,
        *,
        test: bool = False,
        kind: str | None = None,
        point_id: int | None = None,
        network: str | None = None,
        run_id: int | None = None,
    ) -> Failover:
        """Start a VM at the target from a recovery point (`kind` or `test`; default unplanned)."""
        return _failover.failover(
            self.engine,
            vm_key,
            kind or ("test" if test else "unplanned"),
            point_id=point_id,
            network=network,
            run_id=run_id,
        )

    def cleanup(self, vm_key: str) -> list[int]:
        """Remove every test failover of a VM (idempotent)."""
        return _failover.cleanup(self.engine, vm_key)

    def commit(self, vm_key: str) -> Failover:
        return _commit.commit(self.engine, vm_key)

    def reprotect(self, vm_key: str) -> Protection:
        return _reprotect.reprotect(self.engine, vm_key)

    def failback(self, vm_key: str, run_id: int | None = None) -> Failover:
        return _failback.failback(self.engine, vm_key, run_id)


__all__ = ["KINDS", "Lifecycle", "PlanActions"]
