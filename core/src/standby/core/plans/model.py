"""Recovery plans: the TOML file model and its loading.

A plan is versionable text: ordered groups of protected VMs (the VMs of one group fail over
in parallel, groups one after the other) with actions before and after each group and around
the whole plan. Every problem of a file is a one-line error naming the file and the key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

from standby.core.config import first_error, parse_duration
from standby.core.errors import ConfigError

RUN_KINDS = ("test", "planned", "unplanned", "drill", "commit", "reprotect", "failback", "cleanup")
"""Every kind of plan run."""

FAILOVER_KINDS = ("test", "planned", "unplanned")
"""Run kinds whose VM steps are failovers of that kind (a drill is a test failover)."""

WITH_ACTIONS = ("test", "planned", "unplanned", "drill", "failback")
"""Run kinds that execute the plan's before/after actions; the others only touch VMs."""

VM_STEP_KINDS = ("failover", "commit", "reprotect", "failback", "cleanup")
"""Step kinds that call the engine for one VM."""

ACTION_TYPES = ("script", "manual", "wait")


def _seconds(value: object) -> float:
    """A duration: '30s', '2m', '1h', '7d', or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration like 30s, 2m or 1h")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(parse_duration(value))
        except ConfigError:
            raise ValueError(f"'{value}' is not a duration like 30s, 2m or 1h") from None
    raise ValueError("must be a duration like 30s, 2m or 1h")


Seconds = Annotated[float, BeforeValidator(_seconds)]
"""A duration in a plan file, held as seconds."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScriptAction(_Strict):
    """Run `/bin/sh -c command` in the plan file's folder; exit 0 is success."""

    type: Literal["script"]
    command: str
    timeout: Seconds = 600.0
    on_failure: Literal["stop", "continue"] = "stop"


class ManualAction(_Strict):
    """Stop until an operator acknowledges (`standby plan ack RUN STEP`)."""

    type: Literal["manual"]
    message: str


class WaitAction(_Strict):
    """A health check: a TCP port that must open, or a command that must exit 0, in time.

    In a group's `after` list the check runs once per VM of the group (the VM's failed-over
    address is the default host and is `$STANDBY_VM_ADDRESS` for the command).
    """

    type: Literal["wait"]
    tcp: int | None = None
    host: str | None = None
    command: str | None = None
    timeout: Seconds = 300.0
    interval: Seconds = 5.0
    on_failure: Literal["stop", "continue"] = "stop"


Action = Annotated[ScriptAction | ManualAction | WaitAction, Field(discriminator="type")]


class Group(_Strict):
    """VMs that fail over together (in parallel), with actions around them."""

    name: str
    vms: list[str]
    before: list[Action] = Field(default_factory=list)
    after: list[Action] = Field(default_factory=list)


class Plan(_Strict):
    """A recovery plan: ordered groups with plan-level actions before and after."""

    name: str = ""
    description: str = ""
    before: list[Action] = Field(default_factory=list)
    groups: list[Group]
    after: list[Action] = Field(default_factory=list)

    def vms(self) -> list[str]:
        """Every VM of the plan, in group order, each once."""
        seen: dict[str, None] = {}
        for g in self.groups:
            for vm in g.vms:
                seen.setdefault(vm, None)
        return list(seen)

    def snapshot(self) -> dict[str, Any]:
        """The parsed plan as JSON (stored with each run; resumes never re-read the file)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> Plan:
        return cls.model_validate(data)


def _loc(parts: Iterable[int | str]) -> str:
    """`('groups', 0, 'after', 1, 'wait', 'tcp')` -> `groups[0].after[1].tcp`."""
    out = ""
    prev: int | str | None = None
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(prev, int) and part in ACTION_TYPES:
            pass  # pydantic's union tag, not a key of the file
        else:
            out += f".{part}" if out else part
        prev = part
    return out or "(file)"


def _plan_error(exc: ValidationError) -> str:
    """The first validation problem as one line naming the key (a misspelt one first)."""
    misspelt = first_error(exc, _loc)
    if misspelt:
        return misspelt
    err = exc.errors()[0]
    key = _loc(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{key}'"
    if kind == "missing":
        return f"missing key '{key}'"
    if kind == "union_tag_not_found":
        return f"missing key '{key}.type' (script, manual or wait)"
    if kind == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag", "?")
        return f"key '{key}.type': '{tag}' is not script, manual or wait"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"key '{key}': {msg}"


def load_plan(path: Path) -> Plan:
    """Parse a plan file; every problem is a one-line ConfigError naming the file and key."""
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    data.setdefault("name", path.stem)
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_plan_error(exc)}") from None
