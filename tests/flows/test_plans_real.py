"""Recovery plans on real libvirt: a 3-group plan of 6 VMs with a script, a manual step acked
from another process and health checks; drill, planned failover, re-protect, failback; and a
runner killed at random moments that resumes to the same end state."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from standby.core.config import Policy
from standby.core.state import Failover, PlanRun, RunStep, State
from standby.plugins.physical import lab
from support.labenv import STANDBY, Lab, MiB, write_site

VMS = {"database": ["pdb1", "pdb2"], "app": ["papp1", "papp2"], "web": ["pweb1", "pweb2"]}


@pytest.fixture(scope="module")
def env(labenv: Lab) -> Iterator[Lab]:
    write_site(
        labenv.home,
        "src",
        f'plugin = "physical"\nuri = "{labenv.src_uri}"\npool_dir = "{labenv.base}/srcpool"\n'
        'domain_type = "qemu"\n',
    )
    labenv.release()
    for i, vms in enumerate(VMS.values()):
        for j, vm in enumerate(vms):
            labenv.create_vm(vm, [("vda", 8 * MiB, "qcow2")])
            labenv.write(vm, "vda", 0, 65536, 0x10 + 2 * i + j)
            labenv.engine.protect(vm, "src", "dr", Policy(shutdown_timeout_seconds=1))
            labenv.engine.replicate(vm)
    yield labenv


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port that accepts connections: what the database health check waits for."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def write_plan(path: Path, port: int, log: Path) -> Path:
    path.write_text(
        f"""
name = "erp"
description = "database, then app, then web"

[[before]]
type = "script"
command = "echo \\"$STANDBY_PLAN $STANDBY_KIND start\\" >> {log}"

[[groups]]
name = "database"
vms = {json.dumps(VMS["database"])}
  [[groups.before]]
  type = "manual"
  message = "DBA: confirm the database may start at the DR site"
  [[groups.after]]
  type = "wait"
  tcp = {port}
  host = "127.0.0.1"
  timeout = "20s"
  interval = 0.2

[[groups]]
name = "app"
vms = {json.dumps(VMS["app"])}
  [[groups.after]]
  type = "script"
  command = "echo \\"$STANDBY_GROUP $STANDBY_VM\\" >> {log}"
  timeout = "10s"

[[groups]]
name = "web"
vms = {json.dumps(VMS["web"])}
  [[groups.after]]
  type = "wait"
  command = "test -n \\"$STANDBY_VM\\""
  timeout = "10s"
  interval = 0.2
"""
    )
    return path


def cli_env(env: Lab) -> dict[str, str]:
    return {**os.environ, "STANDBY_HOME": str(env.home)}


def wait_for_state(env: Lab, run_state: str, timeout: float = 120) -> int:
    """Poll the state DB (not the libvirt roots: a CLI process owns them) for a run state."""
    state = State.at(env.home)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with state.session() as s:
                run = s.scalars(select(PlanRun).order_by(PlanRun.id.desc())).first()
                if run is not None and run.state == run_state:
                    return run.id
            time.sleep(0.2)
        raise AssertionError(f"no run reached '{run_state}'")
    finally:
        state.dispose()


def run_with_ack(env: Lab, *args: str) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Start a plan run, ack its manual step from another process, wait for the end."""
    env.release()
    proc = subprocess.Popen(
        [*STANDBY, *args],
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        rid = wait_for_state(env, "waiting")
        ack = subprocess.run(
            [*STANDBY, "plan", "ack", str(rid), "g0.before.0"],
            env=cli_env(env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ack.returncode == 0, ack.stderr
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return rid, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_plan_drill_failover_reprotect_failback(env: Lab, listener: int, tmp_path: Path) -> None:
    log = tmp_path / "actions.log"
    plan = write_plan(tmp_path / "erp.toml", listener, log)
    r = env.cli("plan", "check", str(plan), check=True)
    shown = env.cli("plan", "show", str(plan), "--kind", "planned", check=True).stdout
    assert shown.index("pdb1") < shown.index("papp1") < shown.index("pweb1")

    # drill: test failover of every VM, checks, report, cleanup
    rid, r = run_with_ack(env, "drill", str(plan), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads((env.home / "reports" / f"drill-{rid}.json").read_text())
    assert (env.home / "reports" / f"drill-{rid}.html").read_text().startswith("<!")
    vms = {v["vm"]: v for v in report["vms"]}
    assert set(vms) == {vm for g in VMS.values() for vm in g}
    with env.engine.state.session() as s:
        steps = {st.key: st for st in s.scalars(select(RunStep).where(RunStep.run_id == rid))}
        run = s.get(PlanRun, rid)
        assert run is not None and run.state == "cleaned"
        start = run.started_at
        for vm, fig in vms.items():
            fo = next(st for st in steps.values() if st.kind == "failover" and st.vm == vm)
            assert fig["point_id"] == fo.result["point_id"]
            running_at = fo.result["running_at"]
            assert fig["time_to_running_seconds"] == pytest.approx(
                (_t(running_at) - _t(start)).total_seconds(), abs=0.01
            )
        fos = s.scalars(select(Failover).where(Failover.run_id == rid)).all()
        assert len(fos) == 6 and all(f.state == "cleaned" for f in fos)
    assert report["rto_seconds"] == max(v["recovered_seconds"] for v in report["vms"])
    assert all(v["healthy"] in (True, None) for v in report["vms"])
    assert vms["pdb1"]["rpo_seconds"] is not None and vms["pdb1"]["rpo_seconds"] > 0
    # groups ran in order: the database check passed before the app script ran
    assert log.read_text().splitlines()[0] == "erp drill start"
    assert not any(d.endswith("-test") for d in env.engine.target("dr").domain_names())

    # planned failover: the last writes before shutdown arrive
    for vm in ("pdb1", "pweb2"):
        env.write(vm, "vda", 2 * MiB, 65536, 0x77)
    rid, r = run_with_ack(env, "plan", "failover", str(plan), "--planned")
    assert r.returncode == 0, r.stderr
    for vm in ("pdb1", "pweb2"):
        disk = _disk(env.dr, vm)
        assert lab.has_pattern(disk, 2 * MiB, 65536, 0x77), vm
    env.cli("plan", "commit", str(plan), check=True)
    env.cli("plan", "reprotect", str(plan), check=True)
    # while failed over, the database writes; re-protect brings it home
    lab.guest_write(env.dr, "pdb2", "vda", 3 * MiB, 65536, 0x66)
    for vm in (v for g in VMS.values() for v in g):
        env.engine.replicate(vm)
    rid, r = run_with_ack(env, "plan", "failback", str(plan))
    assert r.returncode == 0, r.stderr
    assert lab.has_pattern(_disk(env.src, "pdb2"), 3 * MiB, 65536, 0x66)
    assert lab.has_pattern(_disk(env.src, "pdb1"), 2 * MiB, 65536, 0x77)
    env.cli("plan", "commit", str(plan), check=True)
    env.cli("plan", "reprotect", str(plan), check=True)
    with env.engine.state.session() as s:
        for vm in (v for g in VMS.values() for v in g):
            p = env.engine.state.protection(s, vm)
            assert (p.source_site, p.target_site, p.state) == ("src", "dr", "protected")


def _t(value: object) -> object:
    from datetime import UTC, datetime

    t = datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(t, datetime)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _disk(conn: object, vm: str) -> Path:
    from standby.plugins.physical.domxml import disk_sources

    dom = conn.lookupByName(vm)  # type: ignore[attr-defined]
    return Path(disk_sources(dom.XMLDesc(0))["vda"]["file"])


def test_killed_runner_resumes_to_the_same_end_state(env: Lab, tmp_path: Path) -> None:
    plan = tmp_path / "kill.toml"
    plan.write_text(
        f"""
name = "killme"
[[groups]]
name = "first"
vms = ["pdb1", "pdb2"]
  [[groups.after]]
  type = "script"
  command = "echo $STANDBY_VM >> {tmp_path}/after.log"
[[groups]]
name = "second"
vms = ["papp1", "pweb1"]
"""
    )
    vms = ["pdb1", "pdb2", "papp1", "pweb1"]
    for vm in vms:  # (after the first test they are re-protected, with no point yet)
        env.engine.replicate(vm)
    rng = random.Random(7)
    for trial in range(3):
        env.release()
        proc = subprocess.Popen(
            [*STANDBY, "plan", "failover", str(plan), "--test"],
            env=cli_env(env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(rng.uniform(1.0, 4.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        state = State.at(env.home)
        with state.session() as s:
            run = s.scalars(select(PlanRun).order_by(PlanRun.id.desc())).first()
            assert run is not None
            rid, finished = run.id, run.state == "succeeded"
        state.dispose()
        errors = []
        for _ in range(3):
            if finished:
                break
            r = env.cli("plan", "resume", str(rid))
            finished = r.returncode == 0
            errors.append(r.stderr + r.stdout)
        assert finished, f"trial {trial}: run {rid} did not finish: {errors}"
        # end state equals an uninterrupted run: one test VM per VM, each failover once
        names = env.engine.target("dr").domain_names()
        assert sorted(n for n in names if n.endswith("-test")) == sorted(f"{v}-test" for v in vms)
        with env.engine.state.session() as s:
            fos = s.scalars(
                select(Failover).where(Failover.run_id == rid, Failover.state == "running")
            ).all()
            steps = s.scalars(select(RunStep).where(RunStep.run_id == rid)).all()
            assert sorted(f.vm_name for f in fos) == sorted(f"{v}-test" for v in vms)
            assert all(st.state == "succeeded" for st in steps)
        env.cli("plan", "cleanup", str(plan), check=True)
        assert not any(n.endswith("-test") for n in env.engine.target("dr").domain_names())
