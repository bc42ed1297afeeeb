"""Recovery plans: the file model, checks, the ordered steps of a run, the durable runner,
drill reports.

Modules: `model` (the TOML file, `load_plan`), `check`, `steps` (`build_steps`, `describe`),
`runner` (`Runner`, the `Actions` it asks of the lifecycle), `executor` (one step), `records`
(run/step rows, `ack`), `shell` (scripts and probes), `views`, `report`, `common`.
The plans never import the engine or the lifecycle: a runner is handed its `Actions`.
"""

from __future__ import annotations

from .check import check
from .model import (
    FAILOVER_KINDS,
    RUN_KINDS,
    VM_STEP_KINDS,
    WITH_ACTIONS,
    Group,
    ManualAction,
    Plan,
    ScriptAction,
    WaitAction,
    load_plan,
)
from .steps import StepSpec, batch_of, build_steps, describe, step_summary

__all__ = [
    "FAILOVER_KINDS",
    "RUN_KINDS",
    "VM_STEP_KINDS",
    "WITH_ACTIONS",
    "Group",
    "ManualAction",
    "Plan",
    "ScriptAction",
    "StepSpec",
    "WaitAction",
    "batch_of",
    "build_steps",
    "check",
    "describe",
    "load_plan",
    "step_summary",
]
