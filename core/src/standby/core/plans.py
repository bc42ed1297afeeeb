"""Recovery plans: the TOML file model, loading, checking, and the ordered steps of a run.

A plan is versionable text: ordered groups of protected VMs (the VMs of one group fail over
in parallel, groups one after the other) with actions before and after each group and around
the whole plan. `build_steps` turns a plan and a run kind into the flat, ordered list of steps
the runner persists once at run start; `describe` shows that list without executing anything.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

from standby.core.config import parse_duration
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


# ----------------------------------------------------------------------------- loading


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
    """The first validation problem as one line naming the key."""
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


# ----------------------------------------------------------------------------- checking


def _check_action(
    where: str, action: ScriptAction | ManualAction | WaitAction, has_vm: bool
) -> list[str]:
    problems: list[str] = []
    if isinstance(action, ScriptAction):
        if not action.command.strip():
            problems.append(f"{where}: script has an empty command")
        if action.timeout <= 0:
            problems.append(f"{where}: timeout must be positive")
    elif isinstance(action, ManualAction):
        if not action.message.strip():
            problems.append(f"{where}: manual step has an empty message")
    else:
        problems += _check_wait(where, action, has_vm)
    return problems


def _check_wait(where: str, w: WaitAction, has_vm: bool) -> list[str]:
    problems: list[str] = []
    if w.tcp is None and not w.command:
        problems.append(f"{where}: wait needs tcp or command")
    if w.tcp is not None and w.command:
        problems.append(f"{where}: wait takes tcp or command, not both")
    if w.tcp is not None and not 1 <= w.tcp <= 65535:
        problems.append(f"{where}: tcp port {w.tcp} is not between 1 and 65535")
    if w.host is not None and w.tcp is None:
        problems.append(f"{where}: host is only used with tcp")
    if w.tcp is not None and w.host is None and not has_vm:
        problems.append(f"{where}: a tcp wait outside a group's after list needs host")
    if w.timeout <= 0:
        problems.append(f"{where}: timeout must be positive")
    if w.interval <= 0:
        problems.append(f"{where}: interval must be positive")
    elif w.interval > w.timeout > 0:
        problems.append(f"{where}: interval is longer than timeout")
    return problems


def _check_groups(plan: Plan, is_protected: Callable[[str], bool]) -> list[str]:
    problems: list[str] = []
    names: set[str] = set()
    owner: dict[str, int] = {}
    for i, g in enumerate(plan.groups):
        where = f"groups[{i}]"
        if not g.name.strip():
            problems.append(f"{where}: group name is empty")
        elif g.name in names:
            problems.append(f"{where}: group name '{g.name}' is used twice")
        names.add(g.name)
        if not g.vms:
            problems.append(f"{where}: group '{g.name}' has no VMs")
        for vm in g.vms:
            if vm in owner:
                j = owner[vm]
                twice = (
                    f"twice in {where} '{g.name}'"
                    if j == i
                    else f"in groups[{j}] '{plan.groups[j].name}' and {where} '{g.name}'"
                )
                problems.append(f"VM '{vm}' is listed {twice} (a VM fails over once)")
                continue
            owner[vm] = i
            if not is_protected(vm):
                problems.append(f"VM '{vm}' (group '{g.name}') is not protected")
        for j, a in enumerate(g.before):
            problems += _check_action(f"{where}.before[{j}]", a, has_vm=False)
        for j, a in enumerate(g.after):
            problems += _check_action(f"{where}.after[{j}]", a, has_vm=True)
    return problems


def check(plan: Plan, is_protected: Callable[[str], bool]) -> list[str]:
    """Every problem of a plan (empty when it can run), each naming where it is.

    Checked: an empty plan, empty or duplicate group names, empty groups, a VM listed twice
    (in one group or in two: with ordered groups that is the only way a plan can loop back on
    itself), VMs that `is_protected` refuses, and each action (empty command or message, a
    wait with neither `tcp` nor `command`, a port out of range, non-positive durations).
    """
    problems: list[str] = []
    if not plan.name.strip():
        problems.append("plan name is empty")
    if not plan.groups:
        problems.append("the plan has no groups")
    for j, a in enumerate(plan.before):
        problems += _check_action(f"before[{j}]", a, has_vm=False)
    problems += _check_groups(plan, is_protected)
    for j, a in enumerate(plan.after):
        problems += _check_action(f"after[{j}]", a, has_vm=False)
    return problems


# ----------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class StepSpec:
    """One step of a run, as built at run start and stored as a `RunStep` row."""

    key: str
    kind: str
    group_name: str = ""
    vm: str = ""
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> str:
        """Steps with the same batch id that follow each other run in parallel (one per VM)."""
        if not self.vm:
            return self.key
        return batch_of(self.key, self.vm)


def batch_of(key: str, vm: str) -> str:
    """The batch id of a step: its key without the trailing `.<vm>` for per-VM steps."""
    return key[: -(len(vm) + 1)] if vm and key.endswith("." + vm) else key


def _vm_action(kind: str) -> str:
    return "failover" if kind in (*FAILOVER_KINDS, "drill") else kind


def _action_steps(prefix: str, actions: list[Any], group: Group | None) -> list[StepSpec]:
    """Before/after actions; a wait in a group's `after` expands to one step per VM."""
    steps: list[StepSpec] = []
    gname = group.name if group else ""
    for j, action in enumerate(actions):
        spec = action.model_dump(mode="json")
        if isinstance(action, WaitAction) and group is not None and prefix.endswith("after"):
            steps += [StepSpec(f"{prefix}.{j}.{vm}", "wait", gname, vm, spec) for vm in group.vms]
        else:
            steps.append(StepSpec(f"{prefix}.{j}", action.type, gname, "", spec))
    return steps


def _vm_steps(prefix: str, kind: str, group: Group) -> list[StepSpec]:
    action = _vm_action(kind)
    spec: dict[str, Any] = {}
    if action == "failover":
        spec = {"kind": "test" if kind == "drill" else kind, "point": None}
    return [StepSpec(f"{prefix}.{action}.{vm}", action, group.name, vm, spec) for vm in group.vms]


def _cleanup_steps(plan: Plan) -> list[StepSpec]:
    """Test cleanup of every VM of the plan, all in one parallel batch."""
    return [
        StepSpec(f"cleanup.{vm}", "cleanup", g.name, vm, {}) for g in plan.groups for vm in g.vms
    ]


def build_steps(plan: Plan, kind: str, keep: bool = False) -> list[StepSpec]:
    """The ordered steps of a `kind` run of `plan` (a drill with `keep` has no cleanup steps).

    test/planned/unplanned/drill/failback: plan.before, then per group its before actions,
    its VM steps (parallel) and its after actions, then plan.after. A drill adds `report`
    and, unless `keep`, `cleanup.<vm>` steps. commit/reprotect: only the VM steps, group by
    group. cleanup: only `cleanup.<vm>` steps.
    """
    if kind not in RUN_KINDS:
        raise ConfigError(f"unknown run kind '{kind}' (one of {', '.join(RUN_KINDS)})")
    if kind == "cleanup":
        return _cleanup_steps(plan)
    with_actions = kind in WITH_ACTIONS
    steps: list[StepSpec] = []
    if with_actions:
        steps += _action_steps("plan.before", plan.before, None)
    for i, g in enumerate(plan.groups):
        if with_actions:
            steps += _action_steps(f"g{i}.before", g.before, g)
        steps += _vm_steps(f"g{i}", kind, g)
        if with_actions:
            steps += _action_steps(f"g{i}.after", g.after, g)
    if with_actions:
        steps += _action_steps("plan.after", plan.after, None)
    if kind == "drill":
        steps.append(StepSpec("report", "report"))
        if not keep:
            steps += _cleanup_steps(plan)
    return steps


# ----------------------------------------------------------------------------- dry run


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def step_summary(step: StepSpec) -> str:
    """What a step does, in one line."""
    s = step.spec
    if step.kind == "script":
        timeout = _duration(s["timeout"])
        return f"run `{s['command']}` (timeout {timeout}, on failure {s['on_failure']})"
    if step.kind == "manual":
        return f"wait for an operator's ack: {s['message']}"
    if step.kind == "wait":
        host = s.get("host") or f"{step.vm}'s address"
        target = (
            f"tcp {host}:{s['tcp']}" if s.get("tcp") is not None else f"`{s['command']}` exits 0"
        )
        return (
            f"health check {target} (every {_duration(s['interval'])}, "
            f"timeout {_duration(s['timeout'])})"
        )
    if step.kind == "failover":
        return f"{s['kind']} failover of {step.vm}"
    if step.kind == "report":
        return "write the drill report (reports/drill-<run>.json and .html)"
    return _VM_DOES.get(step.kind, "{kind} {vm}").format(kind=step.kind, vm=step.vm)


_VM_DOES = {
    "cleanup": "remove the test failover of {vm}",
    "commit": "commit the failover of {vm}",
    "reprotect": "re-protect {vm} in the other direction",
    "failback": "fail {vm} back to its home site",
}


def describe(plan: Plan, kind: str, keep: bool = False) -> list[dict[str, Any]]:
    """The dry run: every step in order with what it would do; nothing is executed.

    `parallel` is the number of steps in the step's parallel batch (1 = runs alone);
    consecutive steps with the same `batch` run at the same time.
    """
    steps = build_steps(plan, kind, keep)
    sizes: dict[str, int] = {}
    for st in steps:
        sizes[st.batch] = sizes.get(st.batch, 0) + 1
    return [
        {
            "seq": n,
            "key": st.key,
            "kind": st.kind,
            "group": st.group_name,
            "vm": st.vm,
            "parallel": sizes[st.batch],
            "batch": st.batch,
            "does": step_summary(st),
        }
        for n, st in enumerate(steps, 1)
    ]
