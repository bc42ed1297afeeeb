"""The ordered steps of a run, built once at run start; and the dry run that shows them.

`build_steps` turns a plan and a run kind into the flat, ordered list of steps the runner
persists; `describe` shows that list without executing anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from standby.core.errors import ConfigError

from .model import FAILOVER_KINDS, RUN_KINDS, WITH_ACTIONS, Group, Plan, WaitAction


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
