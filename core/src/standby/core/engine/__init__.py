"""The replication engine: it owns the copy loop, threads, retries, progress and checkpoints.

Public API (what the lifecycle, the plan runner, the CLI and tests use):

- `Engine` / `opened(home)`: protect, replicate (`run_cycle` under a lock the caller holds),
  prune, unprotect, usage, cost, `source`/`target`/`site`, `lock`, `step_reporter`.
- `CycleReport`, `Progress`, `NullProgress`, `status_rows`, `due`, `verify_mode`.

Layout, in the order of a cycle: `cycle` (begin -> snapshot -> plan -> copy -> verify ->
commit), `planning` (extents per disk), `copier` (the copy loop), `checkpoint` (durable
progress), `verify`, `commit` (the point becomes visible), `retention`; beside them
`protections`, `status`, `watch` and `context` (state, sites, locks).
"""

from __future__ import annotations

from .engine import Engine, open_state, opened
from .progress import NullProgress, Progress
from .report import CycleReport
from .status import due, status_rows
from .verify import verify_mode

__all__ = [
    "CycleReport",
    "Engine",
    "NullProgress",
    "Progress",
    "due",
    "open_state",
    "opened",
    "status_rows",
    "verify_mode",
]
