"""Plan files: parsing, one-line errors, `check`, the steps of each run kind, the dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from standby.core.errors import ConfigError
from standby.core.plans import Plan, build_steps, check, describe, load_plan

EXAMPLE = """
name = "erp"
description = "ERP: database, then app, then web"
[[before]]
type = "manual"
message = "Tell the service desk the ERP drill starts"
[[groups]]
name = "database"
vms = ["db01", "db02"]
  [[groups.before]]
  type = "script"
  command = "./scripts/fence-db.sh"
  timeout = "30s"
  on_failure = "stop"
  [[groups.after]]
  type = "wait"
  tcp = 5432
  timeout = "2m"
  interval = "2s"
  [[groups.after]]
  type = "script"
  command = "echo db up"
[[groups]]
name = "web"
vms = ["web01"]
[[after]]
type = "script"
command = "curl -fsS https://status.example/ok"
"""


def cli() -> list[str]:
    """`python -m standby.core` once cli.py registers `plan`; the module's own entry until then."""
    from standby.core import cli as main_cli

    registered = any(g.name == "plan" for g in main_cli.app.registered_groups)
    return [sys.executable, "-m", "standby.core" if registered else "standby.core.cli_plans"]


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "STANDBY_HOME": str(home)},
    )


def write(tmp_path: Path, text: str, name: str = "erp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def one_line(exc: pytest.ExceptionInfo[ConfigError], *needles: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_good_file_parses_with_durations(tmp_path: Path) -> None:
    plan = load_plan(write(tmp_path, EXAMPLE))
    assert plan.name == "erp"
    assert [g.name for g in plan.groups] == ["database", "web"]
    assert plan.vms() == ["db01", "db02", "web01"]
    fence = plan.groups[0].before[0]
    assert fence.type == "script" and fence.timeout == 30 and fence.on_failure == "stop"
    wait = plan.groups[0].after[0]
    assert wait.type == "wait" and wait.tcp == 5432 and wait.timeout == 120 and wait.interval == 2
    assert check(plan, lambda vm: True) == []
    assert Plan.from_snapshot(json.loads(json.dumps(plan.snapshot()))) == plan


def test_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    plan = load_plan(write(tmp_path, '[[groups]]\nname = "a"\nvms = ["x"]\n', "billing.toml"))
    assert plan.name == "billing"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("colour = 'red'\n" + EXAMPLE, ["unknown key 'colour'"]),
        (
            EXAMPLE.replace("tcp = 5432", "tcp = 5432\n  bogus = 1"),
            ["unknown key 'groups[0].after[0].bogus'"],
        ),
        (EXAMPLE.replace('timeout = "2m"', 'timeout = "soon"'), ["groups[0].after[0].timeout"]),
        (EXAMPLE.replace('type = "manual"', 'type = "prayer"'), ["before[0].type", "prayer"]),
        (EXAMPLE.replace('on_failure = "stop"', 'on_failure = "shrug"'), ["on_failure"]),
        ('[[groups]]\nvms = ["x"]\n', ["missing key 'groups[0].name'"]),
        ("groups = [\n", ["not valid TOML"]),
    ],
)
def test_bad_files_are_one_line_errors_naming_file_and_key(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_plan(path)
    one_line(exc, str(path), *needles)


def test_check_lists_every_problem(tmp_path: Path) -> None:
    text = """
[[before]]
type = "wait"
tcp = 80
[[groups]]
name = "a"
vms = ["db01", "ghost"]
  [[groups.after]]
  type = "wait"
  timeout = "1m"
[[groups]]
name = "a"
vms = ["db01"]
[[groups]]
name = "empty"
vms = []
  [[groups.before]]
  type = "script"
  command = "true"
  timeout = 0
"""
    plan = load_plan(write(tmp_path, text))
    problems = check(plan, lambda vm: vm != "ghost")
    joined = "; ".join(problems)
    assert "VM 'ghost' (group 'a') is not protected" in joined
    assert "VM 'db01' is listed in groups[0] 'a' and groups[1] 'a'" in joined
    assert "groups[0].after[0]: wait needs tcp or command" in joined
    assert "groups[1]: group name 'a' is used twice" in joined
    assert "groups[2]: group 'empty' has no VMs" in joined
    assert "groups[2].before[0]: timeout must be positive" in joined
    assert "before[0]: a tcp wait outside a group's after list needs host" in joined
    assert len(problems) == 7


def test_steps_of_each_run_kind(tmp_path: Path) -> None:
    plan = load_plan(write(tmp_path, EXAMPLE))
    test = [s.key for s in build_steps(plan, "test")]
    assert test == [
        "plan.before.0",
        "g0.before.0",
        "g0.failover.db01",
        "g0.failover.db02",
        "g0.after.0.db01",
        "g0.after.0.db02",
        "g0.after.1",
        "g1.failover.web01",
        "plan.after.0",
    ]
    failover = build_steps(plan, "planned")[2]
    assert (failover.kind, failover.vm, failover.spec) == (
        "failover",
        "db01",
        {"kind": "planned", "point": None},
    )
    drill = [s.key for s in build_steps(plan, "drill")]
    assert drill == [*test, "report", "cleanup.db01", "cleanup.db02", "cleanup.web01"]
    assert build_steps(plan, "drill")[2].spec["kind"] == "test"
    assert [s.key for s in build_steps(plan, "drill", keep=True)] == [*test, "report"]
    assert [s.key for s in build_steps(plan, "commit")] == [
        "g0.commit.db01",
        "g0.commit.db02",
        "g1.commit.web01",
    ]
    assert [s.kind for s in build_steps(plan, "reprotect")] == ["reprotect"] * 3
    assert [s.key for s in build_steps(plan, "cleanup")] == [
        "cleanup.db01",
        "cleanup.db02",
        "cleanup.web01",
    ]
    failback = build_steps(plan, "failback")
    assert [s.key for s in failback] == [k.replace("failover", "failback") for k in test]
    with pytest.raises(ConfigError):
        build_steps(plan, "sideways")


def test_dry_run_marks_parallel_batches(tmp_path: Path) -> None:
    rows = describe(load_plan(write(tmp_path, EXAMPLE)), "test")
    by_key = {r["key"]: r for r in rows}
    assert by_key["g0.failover.db01"]["parallel"] == 2
    assert by_key["g0.failover.db01"]["batch"] == by_key["g0.failover.db02"]["batch"]
    assert by_key["g0.after.0.db01"]["batch"] != by_key["g0.failover.db01"]["batch"]
    assert by_key["g1.failover.web01"]["parallel"] == 1
    assert by_key["plan.before.0"]["does"].startswith("wait for an operator's ack")
    assert "tcp db01's address:5432" in by_key["g0.after.0.db01"]["does"]


def test_cli_show_file_and_unknown_run(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    home = tmp_path / "home"
    proc = run_cli(home, "plan", "show", str(path), "--kind", "drill", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["dry_run"] and data["steps"][-1]["key"] == "cleanup.web01"
    text = run_cli(home, "plan", "show", str(path))
    assert text.returncode == 0 and "g0.failover.db02" in text.stdout
    missing = run_cli(home, "plan", "show", "99")
    assert missing.returncode == 3 and missing.stderr.startswith("error: no plan run 99")
    assert len(missing.stderr.strip().splitlines()) == 1


def test_cli_check_asks_the_state_which_vms_are_protected(tmp_path: Path) -> None:
    from standby.core.state import Protection, State

    path = write(tmp_path, EXAMPLE)
    home = tmp_path / "home"
    state = State.at(home)
    with state.session() as s:
        s.add(
            Protection(
                vm_id="id-db01",
                vm_name="db01",
                source_site="a",
                target_site="b",
                policy={},
                spec={},
            )
        )
    state.dispose()
    proc = run_cli(home, "plan", "check", str(path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: VM 'db02'")
    assert "VM 'web01' (group 'web') is not protected" in lines[0] and "'db01'" not in lines[0]


def test_a_misspelt_plan_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text('[[groups]]\nnmae = "db"\nvms = ["x"]\n')
    with pytest.raises(
        ConfigError, match=r"unknown key 'groups\[0\]\.nmae' \(did you mean 'name'\?\)"
    ):
        load_plan(path)
