"""The `standby` command line (typer; rich for people, JSON for scripts).

`app` is the one typer application; `main` its entry point. One module per command group:
`sites` (plugins, sites, vms), `protect`, `replicate`, `info` (status, events, points),
`failover` (failover, commit, reprotect, failback), `cost`, `plans` (plan, drill).
"""

from __future__ import annotations

from .app import app, main
from .common import home

__all__ = ["app", "home", "main"]
