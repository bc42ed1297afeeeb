"""Plan runs: order and parallelism, scripts, manual acks from another process, health checks,
failures, resume after kill -9, and the drill report's figures. No libvirt: fake actions."""

from __future__ import annotations

import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from standby.core.errors import Busy, ConfigError, NotFound
from standby.core.locks import FileLock
from standby.core.plans import load_plan
from standby.core.plans.common import aware, lock_path, parse_time
from standby.core.plans.records import RunOutcome, ack
from standby.core.plans.runner import Runner, StepFailed
from standby.core.state import PlanRun, RunStep, State

HERE = Path(__file__).parent


# ----------------------------------------------------------------------------- fakes


def _result(action: str, vm: str, run_id: int, started: datetime, n: int) -> dict[str, Any]:
    point_time = started - timedelta(seconds=300 + n)
    return {
        "action": action,
        "failover_id": 100 + n,
        "vm_name": f"{vm}-test",
        "point_id": 10 + n,
        "point_time": point_time.isoformat(),
        "started_at": started.isoformat(),
        "running_at": datetime.now(UTC).isoformat(),
        "addresses": [f"10.0.0.{n + 1}"],
        "data_loss_seconds": None,
        "run": run_id,
    }


class FakeActions:
    """In-memory actions: idempotent per (action, vm, run), with call spans for ordering."""

    def __init__(
        self,
        delay: float = 0.05,
        fail: dict[str, Exception] | None = None,
        unprotected: tuple[str, ...] = (),
    ) -> None:
        self.delay = delay
        self.fail = fail or {}
        self.unprotected = unprotected
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, int]] = []
        self.spans: dict[tuple[str, str], tuple[float, float]] = {}
        self.results: dict[tuple[str, str, int], dict[str, Any]] = {}

    def protected(self, vm: str) -> bool:
        return vm not in self.unprotected

    def _act(self, action: str, vm: str, run_id: int) -> dict[str, Any]:
        key = (action, vm, run_id)
        with self.lock:
            self.calls.append(key)
            if key in self.results:
                return self.results[key]
            n = len(self.results)
        t0, started = time.monotonic(), datetime.now(UTC)
        time.sleep(self.delay)
        if vm in self.fail:
            raise self.fail[vm]
        result = _result(action, vm, run_id, started, n)
        with self.lock:
            self.results[key] = result
            self.spans[(action, vm)] = (t0, time.monotonic())
        return result

    def failover(
        self, vm: str, kind: str, run_id: int, point_id: int | None = None
    ) -> dict[str, Any]:
        return {**self._act("failover", vm, run_id), "kind": kind}

    def cleanup(self, vm: str, run_id: int) -> dict[str, Any]:
        return self._act("cleanup", vm, run_id)

    def commit(self, vm: str, run_id: int) -> dict[str, Any]:
        return self._act("commit", vm, run_id)

    def reprotect(self, vm: str, run_id: int) -> dict[str, Any]:
        return self._act("reprotect", vm, run_id)

    def failback(self, vm: str, run_id: int) -> dict[str, Any]:
        return self._act("failback", vm, run_id)


class FileActions(FakeActions):
    """Actions whose record lives in files, for runners in killed subprocesses.

    The effect of an action is its result file (written atomically); a repeated call finds
    it and returns it, as the engine does for an already-done failover of a run.
    """

    def __init__(self, root: Path, delay: float = 0.15) -> None:
        super().__init__(delay)
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, line: str) -> None:
        with open(self.root / name, "a") as f:
            f.write(line + "\n")

    def _act(self, action: str, vm: str, run_id: int) -> dict[str, Any]:
        self._append("calls.log", f"{action} {vm} {run_id}")
        done = self.root / f"{action}-{vm}-{run_id}.json"
        if done.exists():
            found: dict[str, Any] = json.loads(done.read_text())
            return found
        started = datetime.now(UTC)
        time.sleep(self.delay)
        result = _result(action, vm, run_id, started, int(vm[-1]))
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, done)
        self._append("effects.log", f"{action} {vm} {run_id}")
        return result


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    st = State.at(tmp_path)
    yield st
    st.dispose()


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that accepts (and closes) every connection."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                conn.close()
            except OSError:
                continue

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def plan_file(tmp_path: Path, text: str, name: str = "erp") -> Path:
    path = tmp_path / "plans" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def steps_of(state: State, run_id: int) -> dict[str, RunStep]:
    with state.session() as s:
        rows = s.query(RunStep).filter(RunStep.run_id == run_id).order_by(RunStep.seq).all()
        return {r.key: r for r in rows}


def run_of(state: State, run_id: int) -> PlanRun:
    with state.session() as s:
        run = s.get(PlanRun, run_id)
        assert run is not None
        return run


def start(
    state: State, home: Path, path: Path, kind: str, actions: FakeActions, keep: bool = False
) -> tuple[Runner, int]:
    runner = Runner(state, home, actions, poll=0.05)
    return runner, runner.start(load_plan(path), path, kind, keep)


def cli() -> list[str]:
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


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- a full run


THREE_GROUPS = """
description = "three groups"
[[before]]
type = "manual"
message = "Tell the service desk"
[[groups]]
name = "database"
vms = ["db01", "db02"]
  [[groups.before]]
  type = "script"
  command = "env | grep ^STANDBY_ | sort > ../env-database.txt"
  timeout = "5s"
  [[groups.after]]
  type = "wait"
  tcp = PORT
  host = "127.0.0.1"
  timeout = "5s"
  interval = 0.05
[[groups]]
name = "app"
vms = ["app01"]
  [[groups.after]]
  type = "script"
  command = "echo \\"$STANDBY_VM=$STANDBY_VM_ADDRESS\\" > ../app-address.txt"
[[groups]]
name = "web"
vms = ["web01", "web02"]
[[after]]
type = "script"
command = "echo done > ../plan-after.txt"
"""


def test_three_groups_in_order_with_script_ack_from_another_process_and_tcp_wait(
    tmp_path: Path, state: State, listener: int
) -> None:
    path = plan_file(tmp_path, THREE_GROUPS.replace("PORT", str(listener)))
    actions = FakeActions(delay=0.2)
    runner, rid = start(state, tmp_path, path, "test", actions)
    outcome: list[RunOutcome] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run(rid)))
    thread.start()
    wait_for(lambda: steps_of(state, rid)["plan.before.0"].state == "waiting")
    assert run_of(state, rid).state == "waiting"
    assert actions.calls == []  # nothing happens before the ack

    proc = run_cli(tmp_path, "plan", "ack", str(rid), "plan.before.0")
    assert proc.returncode == 0, proc.stderr
    assert "acknowledged" in proc.stdout
    thread.join(timeout=30)
    assert outcome and outcome[0].state == "succeeded"

    steps = steps_of(state, rid)
    assert {k: s.state for k, s in steps.items()} == dict.fromkeys(steps, "succeeded")
    assert steps["plan.before.0"].result["acked_by"]
    assert steps["g0.after.0.db01"].result["target"] == f"tcp 127.0.0.1:{listener}"
    # groups in order; VMs of a group in parallel
    span = actions.spans
    assert max(span["failover", "db01"][0], span["failover", "db02"][0]) < min(
        span["failover", "db01"][1], span["failover", "db02"][1]
    )
    assert max(span["failover", v][1] for v in ("db01", "db02")) <= span["failover", "app01"][0]
    assert span["failover", "app01"][1] <= min(span["failover", v][0] for v in ("web01", "web02"))
    assert max(span["failover", "web01"][0], span["failover", "web02"][0]) < min(
        span["failover", "web01"][1], span["failover", "web02"][1]
    )
    assert sorted({c[1] for c in actions.calls}) == ["app01", "db01", "db02", "web01", "web02"]
    env = (tmp_path / "env-database.txt").read_text()
    for line in (
        "STANDBY_PLAN=erp",
        f"STANDBY_RUN={rid}",
        "STANDBY_GROUP=database",
        "STANDBY_VM=db01,db02",
        "STANDBY_KIND=test",
    ):
        assert line in env.splitlines(), env
    address = steps["g1.failover.app01"].result["addresses"][0]
    assert (tmp_path / "app-address.txt").read_text().strip() == f"app01={address}"
    assert (tmp_path / "plan-after.txt").exists()

    twice = run_cli(tmp_path, "plan", "ack", str(rid), "plan.before.0")
    assert twice.returncode == 2 and "is not waiting" in twice.stderr
    assert len(twice.stderr.strip().splitlines()) == 1
    wrong_run = run_cli(tmp_path, "plan", "ack", "999", "plan.before.0")
    assert wrong_run.returncode == 3 and wrong_run.stderr.startswith("error: no plan run 999")
    listing = run_cli(tmp_path, "plan", "runs", "--json")
    assert [r["state"] for r in json.loads(listing.stdout)] == ["succeeded"]
    shown = run_cli(tmp_path, "plan", "show", str(rid))
    assert shown.returncode == 0 and "g2.failover.web02" in shown.stdout


def test_ack_errors_and_no_wait_then_resume(tmp_path: Path, state: State) -> None:
    text = """
[[groups]]
name = "a"
vms = ["a1"]
  [[groups.before]]
  type = "manual"
  message = "check the firewall"
"""
    path = plan_file(tmp_path, text)
    actions = FakeActions()
    runner, rid = start(state, tmp_path, path, "test", actions)
    with pytest.raises(ConfigError, match="is not waiting"):
        ack(state, rid, "g0.before.0")  # not reached yet
    outcome = runner.run(rid, wait=False)
    assert outcome.state == "waiting" and outcome.waiting is not None
    assert outcome.waiting["key"] == "g0.before.0"
    assert outcome.waiting["message"] == "check the firewall"
    with pytest.raises(ConfigError, match="has no step 'nope'"):
        ack(state, rid, "nope")
    with pytest.raises(NotFound):
        ack(state, rid + 1, "g0.before.0")
    step_id = steps_of(state, rid)["g0.before.0"].id
    with pytest.raises(ConfigError, match="has no step"):
        ack(state, rid, str(step_id + 1000))
    done = ack(state, rid, str(step_id), user="alice")  # by numeric step id
    assert done["acked_by"] == "alice"
    with pytest.raises(ConfigError, match="acked by alice"):
        ack(state, rid, "g0.before.0")
    assert runner.run(rid).state == "succeeded"
    assert actions.calls == [("failover", "a1", rid)]
    assert runner.run(rid).state == "succeeded"  # resuming a finished run does nothing
    assert len(actions.calls) == 1


def test_a_second_runner_of_the_same_run_is_busy(tmp_path: Path, state: State) -> None:
    path = plan_file(tmp_path, '[[groups]]\nname = "a"\nvms = ["a1"]\n')
    runner, rid = start(state, tmp_path, path, "test", FakeActions())
    with FileLock(lock_path(tmp_path, rid), "test"), pytest.raises(Busy, match=f"run {rid}"):
        runner.run(rid)
    with FileLock(lock_path(tmp_path, rid), "test"), pytest.raises(Busy, match="active"):
        runner.start(load_plan(path), path, "test")  # same plan, active run
    assert runner.run(rid).state == "succeeded"


def test_unprotected_vm_refuses_to_start(tmp_path: Path, state: State) -> None:
    path = plan_file(tmp_path, '[[groups]]\nname = "a"\nvms = ["a1", "a2"]\n')
    with pytest.raises(ConfigError, match=r"VM 'a2' \(group 'a'\) is not protected"):
        start(state, tmp_path, path, "test", FakeActions(unprotected=("a2",)))


# ----------------------------------------------------------------------------- failures


def test_script_timeout_kills_the_process_group(tmp_path: Path, state: State) -> None:
    text = """
[[groups]]
name = "a"
vms = ["a1"]
  [[groups.before]]
  type = "script"
  command = "echo started; sleep 30 & echo $! > ../bg.pid; sleep 30"
  timeout = "1s"
"""
    path = plan_file(tmp_path, text)
    actions = FakeActions()
    runner, rid = start(state, tmp_path, path, "test", actions)
    t0 = time.monotonic()
    with pytest.raises(StepFailed, match=r"timed out after 1\.0s") as exc:
        runner.run(rid)
    assert time.monotonic() - t0 < 2.5
    assert "\n" not in str(exc.value) and "plan resume" in str(exc.value)
    step = steps_of(state, rid)["g0.before.0"]
    assert step.state == "failed" and step.result["timed_out"]
    assert "started" in step.output
    bg = int((tmp_path / "bg.pid").read_text())
    wait_for(lambda: _gone(bg), timeout=2)
    assert run_of(state, rid).state == "failed"
    assert actions.calls == []
    assert steps_of(state, rid)["g0.failover.a1"].state == "pending"


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_on_failure_continue_and_failed_vm_in_a_group(tmp_path: Path, state: State) -> None:
    text = """
[[before]]
type = "script"
command = "echo nope >&2; exit 3"
on_failure = "continue"
[[groups]]
name = "a"
vms = ["a1", "a2"]
[[groups]]
name = "b"
vms = ["b1"]
"""
    path = plan_file(tmp_path, text)
    actions = FakeActions(delay=0.2, fail={"a2": NotFound("a2 has no recovery point")})
    runner, rid = start(state, tmp_path, path, "test", actions)
    with pytest.raises(StepFailed, match=r"g0\.failover\.a2 failed: a2 has no recovery") as exc:
        runner.run(rid)
    assert exc.value.exit_code == 3
    steps = steps_of(state, rid)
    before = steps["plan.before.0"]
    assert before.state == "failed" and before.result["continued"]
    assert before.result["error"] == "script `echo nope >&2; exit 3` exited with 3: nope"
    assert steps["g0.failover.a1"].state == "succeeded"  # its sibling finished and is recorded
    assert steps["g0.failover.a2"].state == "failed"
    assert steps["g1.failover.b1"].state == "pending"
    assert ("failover", "b1", rid) not in actions.calls

    actions.fail.clear()  # the cause is fixed: resume retries only the failed step
    outcome = runner.run(rid)
    assert outcome.state == "succeeded" and outcome.continued == ["plan.before.0"]
    assert [c[1] for c in actions.calls].count("a1") == 1
    assert steps_of(state, rid)["g0.failover.a2"].attempts == 2


def test_health_check_that_never_passes_then_resume_and_skip(tmp_path: Path, state: State) -> None:
    port = free_port()
    text = f"""
[[groups]]
name = "a"
vms = ["a1"]
  [[groups.after]]
  type = "wait"
  tcp = {port}
  host = "127.0.0.1"
  timeout = 0.5
  interval = 0.1
  [[groups.after]]
  type = "wait"
  command = "test \\"$STANDBY_VM_ADDRESS\\" = 10.0.0.1"
  timeout = 2
  interval = 0.1
"""
    path = plan_file(tmp_path, text)
    runner, rid = start(state, tmp_path, path, "test", FakeActions())
    t0 = time.monotonic()
    with pytest.raises(StepFailed) as exc:
        runner.run(rid)
    assert time.monotonic() - t0 < 3
    msg = str(exc.value)
    assert f"a1: health check tcp 127.0.0.1:{port} did not pass within 0.5s" in msg
    step = steps_of(state, rid)["g0.after.0.a1"]
    assert step.state == "failed" and step.result["attempts"] >= 2
    with pytest.raises(StepFailed):
        runner.run(rid)  # still closed: fails again
    assert steps_of(state, rid)["g0.after.0.a1"].attempts == 2
    outcome = runner.run(rid, skip=["g0.after.0.a1"])
    assert outcome.state == "succeeded"
    steps = steps_of(state, rid)
    assert steps["g0.after.0.a1"].state == "skipped"
    assert steps["g0.after.1.a1"].state == "succeeded"  # the command check saw the address


# ----------------------------------------------------------------------------- drill report


DRILL = """
description = "<b>drill</b> & co"
[[groups]]
name = "db"
vms = ["db1", "db2"]
  [[groups.after]]
  type = "wait"
  tcp = PORT
  host = "127.0.0.1"
  timeout = 5
  interval = 0.05
  [[groups.after]]
  type = "script"
  command = "sleep 0.1"
[[groups]]
name = "web"
vms = ["web1"]
"""


def test_drill_report_figures_come_from_the_recorded_steps(
    tmp_path: Path, state: State, listener: int
) -> None:
    path = plan_file(tmp_path, DRILL.replace("PORT", str(listener)))
    actions = FakeActions(delay=0.1)
    runner, rid = start(state, tmp_path, path, "drill", actions)
    outcome = runner.run(rid)
    assert outcome.state == "cleaned"
    assert outcome.report_path == str(tmp_path / "reports" / f"drill-{rid}.html")
    report = json.loads((tmp_path / "reports" / f"drill-{rid}.json").read_text())
    assert run_of(state, rid).report == report == outcome.report

    steps = steps_of(state, rid)
    run_start = aware(run_of(state, rid).started_at)
    assert run_start is not None
    figures = {v["vm"]: v for v in report["vms"]}
    recovered = []
    for vm, group in (("db1", "g0"), ("db2", "g0"), ("web1", "g1")):
        fo = steps[f"{group}.failover.{vm}"].result
        v = figures[vm]
        point_time, fo_start = parse_time(fo["point_time"]), parse_time(fo["started_at"])
        running = parse_time(fo["running_at"])
        assert point_time and fo_start and running
        assert v["point_id"] == fo["point_id"] and v["point_time"] == point_time.isoformat()
        assert v["rpo_seconds"] == pytest.approx((fo_start - point_time).total_seconds(), abs=1e-3)
        assert v["time_to_running_seconds"] == pytest.approx(
            (running - run_start).total_seconds(), abs=1e-3
        )
        if group == "g0":
            finished = aware(steps[f"g0.after.0.{vm}"].finished_at)
            assert finished is not None
            healthy = (finished - run_start).total_seconds()
            assert v["time_to_healthy_seconds"] == pytest.approx(healthy, abs=1e-3)
            assert v["healthy"] is True
            recovered.append(healthy)
        else:
            assert v["time_to_healthy_seconds"] is None and v["healthy"] is None
            recovered.append(v["time_to_running_seconds"])
        assert {s["key"] for s in v["steps"]} >= {f"{group}.failover.{vm}", f"cleanup.{vm}"}
    assert report["rto_seconds"] == pytest.approx(max(recovered), abs=1e-3)
    # the report was written before the cleanup steps ran
    report_done = aware(steps["report"].finished_at)
    assert report_done is not None
    for vm in ("db1", "db2", "web1"):
        started = aware(steps[f"cleanup.{vm}"].started_at)
        assert started is not None and started >= report_done
    assert {c for c in actions.calls if c[0] == "cleanup"} == {
        ("cleanup", vm, rid) for vm in ("db1", "db2", "web1")
    }
    page = (tmp_path / "reports" / f"drill-{rid}.html").read_text()
    assert "&lt;b&gt;drill&lt;/b&gt; &amp; co" in page and "<b>drill" not in page
    assert "<script" not in page and "db1-test" in page


def test_drill_keep_leaves_test_vms_and_a_failed_drill_still_reports(
    tmp_path: Path, state: State
) -> None:
    path = plan_file(tmp_path, '[[groups]]\nname = "a"\nvms = ["a1"]\n')
    actions = FakeActions()
    runner, rid = start(state, tmp_path, path, "drill", actions, keep=True)
    assert runner.run(rid).state == "succeeded"
    assert all(c[0] == "failover" for c in actions.calls)

    bad = plan_file(
        tmp_path,
        DRILL.replace("PORT", str(free_port())).replace("timeout = 5", "timeout = 0.3"),
        "bad",
    )
    runner, rid = start(state, tmp_path, bad, "drill", actions)
    with pytest.raises(StepFailed):
        runner.run(rid)
    report = json.loads((tmp_path / "reports" / f"drill-{rid}.json").read_text())
    assert report["state"] == "failed" and report["rto_seconds"] is None
    assert report["problems"] and figures_healthy(report) == {False}


def figures_healthy(report: dict[str, Any]) -> set[bool]:
    return {v["healthy"] for v in report["vms"] if v["healthy"] is not None}


# ----------------------------------------------------------------------------- durability


DURABLE = """
[[before]]
type = "script"
command = "echo plan-before >> ../effects.txt"
[[groups]]
name = "a"
vms = ["a1", "a2"]
  [[groups.before]]
  type = "script"
  command = "sleep 0.1; echo a-before $STANDBY_VM >> ../effects.txt"
  [[groups.after]]
  type = "wait"
  tcp = PORT
  host = "127.0.0.1"
  timeout = 10
  interval = 0.05
  [[groups.after]]
  type = "script"
  command = "echo a-after $STANDBY_VM_ADDRESS >> ../effects.txt"
[[groups]]
name = "b"
vms = ["b3"]
  [[groups.after]]
  type = "wait"
  command = "test -n \\"$STANDBY_VM_ADDRESS\\""
  timeout = 10
  interval = 0.05
[[groups]]
name = "c"
vms = ["c4", "c5", "c6"]
[[after]]
type = "script"
command = "echo plan-after >> ../effects.txt"
"""

RUNNER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_runner import FileActions
from standby.core.plans.runner import Runner
from standby.core.state import State
home = Path(sys.argv[1])
Runner(State.at(home), home, FileActions(home / "fake"), poll=0.05).run(int(sys.argv[2]))
"""

EFFECTS = {
    "plan-before",
    "a-before a1,a2",
    "a-after 10.0.0.2,10.0.0.3",
    "plan-after",
}


def _prepare(base: Path, seed: int, port: int) -> tuple[Path, int]:
    """A drill run, recorded but not started (migrations are not thread-safe: serially)."""
    home = base / f"trial{seed}"
    path = plan_file(home, DURABLE.replace("PORT", str(port)), "durable")
    state = State.at(home)
    try:
        runner = Runner(state, home, FileActions(home / "fake"))
        return home, runner.start(load_plan(path), path, "drill")
    finally:
        state.dispose()


def _finished_steps(home: Path, rid: int) -> int:
    with sqlite3.connect(home / "state.db", timeout=30) as db:
        query = "SELECT count(*) FROM run_steps WHERE run_id = ? AND state = 'succeeded'"
        found: int = db.execute(query, (rid,)).fetchone()[0]
        return found


def _kill_and_resume(home: Path, rid: int, seed: int, total: int) -> int:
    """Run the drill in subprocesses, kill -9 each of the first three at a random moment
    (after a random number of finished steps, plus a random part of the next step), then
    resume until done. Returns how many runners were killed with steps left to do."""
    rng = random.Random(seed)
    kills = 0
    for attempt in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(home), str(rid), str(HERE)],
            stderr=subprocess.PIPE,
        )
        if attempt < 3:
            target = min(_finished_steps(home, rid) + rng.randint(0, 5), total - 2)
            deadline = time.monotonic() + 30
            while _finished_steps(home, rid) < target and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
            if proc.poll() is None:
                kills += _finished_steps(home, rid) < total
                proc.kill()  # SIGKILL
                proc.wait()
                continue
        proc.wait(timeout=60)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        break
    return kills


def test_kill_minus_9_at_random_moments_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, listener: int
) -> None:
    reference_home = tmp_path / "reference"
    path = plan_file(reference_home, DURABLE.replace("PORT", str(listener)), "durable")
    ref_state = State.at(reference_home)
    ref_runner = Runner(ref_state, reference_home, FileActions(reference_home / "fake"))
    ref_id = ref_runner.start(load_plan(path), path, "drill")
    assert ref_runner.run(ref_id).state == "cleaned"
    reference = {k: (s.kind, s.state) for k, s in steps_of(ref_state, ref_id).items()}
    ref_state.dispose()

    prepared = [_prepare(tmp_path, seed, listener) for seed in range(5)]
    with ThreadPoolExecutor(5) as pool:
        kills = list(
            pool.map(lambda n: _kill_and_resume(*prepared[n], n, len(reference)), range(5))
        )
    assert all(kills) and sum(kills) >= 10, kills  # runners were really killed mid-run
    for home, rid in prepared:
        state = State.at(home)
        run, steps = run_of(state, rid), steps_of(state, rid)
        state.dispose()
        assert run.state == "cleaned"
        assert {k: (s.kind, s.state) for k, s in steps.items()} == reference
        fake = home / "fake"
        effects = (fake / "effects.log").read_text().splitlines()
        for key, step in steps.items():
            assert step.finished_at is not None and step.attempts >= 1
            if step.vm and step.kind in ("failover", "cleanup"):
                recorded = json.loads((fake / f"{step.kind}-{step.vm}-{rid}.json").read_text())
                assert {k: step.result[k] for k in recorded} == recorded, key
                assert effects.count(f"{step.kind} {step.vm} {rid}") <= 1
        lines = set((home / "effects.txt").read_text().splitlines())
        assert lines >= EFFECTS
        assert (home / "reports" / f"drill-{rid}.json").exists()
