"""Checking a plan: every problem at once, each naming where it is."""

from __future__ import annotations

from collections.abc import Callable

from .model import ManualAction, Plan, ScriptAction, WaitAction


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
