"""Faults on real embedded libvirt hosts: kill -9 mid-cycle, concurrent runs, a vanished VM."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from standby.plugins.physical import conn as lv
from standby.plugins.physical import lab
from support.labenv import STANDBY, Lab, MiB


def _fill(env: Lab, vm: str, mib: int, offset_mib: int = 0) -> None:
    for i in range(mib):
        env.write(vm, "vda", (offset_mib + i) * MiB, MiB, 0x10 + i % 200)


def _progress_rows(home: Path) -> int:
    db = sqlite3.connect(home / "state.db")
    try:
        return int(db.execute("select count(*) from cycle_disks").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def _last_point_id(home: Path) -> int:
    db = sqlite3.connect(home / "state.db")
    try:
        return int(db.execute("select coalesce(max(id), 0) from recovery_points").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def _compare(env: Lab, vm: str) -> None:
    points = json.loads(env.cli("points", vm, "--json", check=True).stdout)
    assert points
    latest = points[-1]["id"]
    db = sqlite3.connect(env.home / "state.db")
    ref = json.loads(
        db.execute("select ref from recovery_points where id=?", (latest,)).fetchone()[0]
    )
    db.close()
    lab.guest_flush(env.src, vm, "vda")
    assert lab.images_equal(env.disk_path(vm, "vda"), Path(ref["files"]["vda"]))


def test_killed_mid_cycle_resumes_without_a_half_visible_point(labenv: Lab) -> None:
    env = labenv
    env.create_vm("kill1", [("vda", 96 * MiB, "qcow2")])
    _fill(env, "kill1", 40)
    # 40 MiB at 64 Mbit/s takes ~5 s: long enough to kill the process after a checkpoint.
    env.cli("protect", "kill1", "--from", "src", "--to", "dr", "--bandwidth-mbps", "64", check=True)
    last_id = _last_point_id(env.home)
    proc = subprocess.Popen(
        [*STANDBY, "replicate", "kill1"],
        env={**os.environ, "STANDBY_HOME": str(env.home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while _progress_rows(env.home) == 0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)

    assert json.loads(env.cli("points", "kill1", "--json", check=True).stdout) == []
    status = json.loads(env.cli("status", "--json", check=True).stdout)
    row = next(r for r in status if r["vm"] == "kill1")
    assert row["points"] == 0 and row["last_cycle"]["status"] == "running"
    assert row["health"] == "resumable", "a dead process's cycle is not 'replicating'"

    # The guest keeps writing while standby is down: in copied and in uncopied ranges.
    _fill(env, "kill1", 2, offset_mib=1)
    _fill(env, "kill1", 2, offset_mib=60)
    env.release()
    done = env.cli("replicate", "kill1", "--json", check=True)
    report = json.loads(done.stdout)[0]
    assert report["resumed"] is True
    assert report["kind"] == "full", "the initial sync resumed is still the full sync"
    assert report["point_id"] == last_id + 1, "the killed run used no point id"
    assert report["bytes_read"] < 44 * MiB, "a resumed cycle does not start over"
    events = json.loads(env.cli("events", "kill1", "--json", check=True).stdout)
    assert any("(full, crash, resumed)" in e["message"] for e in events), events
    _compare(env, "kill1")
    incremental = json.loads(env.cli("replicate", "kill1", "--json", check=True).stdout)[0]
    assert incremental["kind"] == "incremental" and incremental["bytes_read"] == 0


def test_nbd_server_left_by_a_previous_process_is_stopped(labenv: Lab, tmp_path: Path) -> None:
    """A process that exits before libvirt handles its backup's end leaves QEMU's NBD server up."""
    env = labenv
    env.create_vm("nbd1", [("vda", 32 * MiB, "qcow2")])
    _fill(env, "nbd1", 3)
    env.cli("protect", "nbd1", "--from", "src", "--to", "dr", check=True)
    env.cli("replicate", "nbd1", check=True)
    env.write("nbd1", "vda", 8 * MiB, MiB, 0x77)
    sock = tmp_path / "left.sock"
    addr = {"type": "unix", "data": {"path": str(sock)}}
    reply = lv.qmp(env.src.lookupByName("nbd1"), "nbd-server-start", addr=addr)
    assert "error" not in reply, reply
    env.release()
    done = json.loads(env.cli("replicate", "nbd1", "--json", check=True).stdout)[0]
    assert done["kind"] == "incremental" and done["bytes_read"] == MiB
    _compare(env, "nbd1")
    assert any("NBD server a previous run left" in n for n in done["notes"]), done
    # And back-to-back runs of separate processes never trip over their own NBD servers.
    for i in range(4):
        env.write("nbd1", "vda", i * MiB, MiB, 0x30 + i)
        env.cli("replicate", "nbd1", check=True)
    _compare(env, "nbd1")


def test_two_replications_of_one_vm_never_run_at_once(labenv: Lab) -> None:
    env = labenv
    env.create_vm("conc1", [("vda", 64 * MiB, "qcow2")])
    _fill(env, "conc1", 16)
    env.cli("protect", "conc1", "--from", "src", "--to", "dr", "--bandwidth-mbps", "80", check=True)
    run_env = {**os.environ, "STANDBY_HOME": str(env.home)}
    procs = [
        subprocess.Popen(
            [*STANDBY, "replicate", "conc1"],
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 8], results
    refused = next(err for code, err in results if code == 8)
    assert "already running" in refused or "in use by another standby process" in refused
    assert len(refused.strip().splitlines()) == 1
    _compare(env, "conc1")


def test_source_vm_deleted_while_protected(labenv: Lab) -> None:
    env = labenv
    env.create_vm("gone1", [("vda", 16 * MiB, "qcow2")])
    env.write("gone1", "vda", 0, MiB, 0x5E)
    env.cli("protect", "gone1", "--from", "src", "--to", "dr", check=True)
    env.cli("replicate", "gone1", check=True)
    lab.destroy_vm(env.src, "gone1")
    env.release()
    proc = env.cli("replicate", "gone1")
    assert proc.returncode == 3
    assert "no longer exists" in proc.stderr and "1 recovery point(s) are kept" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    status = json.loads(env.cli("status", "--json", check=True).stdout)
    row = next(r for r in status if r["vm"] == "gone1")
    assert row["health"] == "source-missing" and row["points"] == 1
    assert len(json.loads(env.cli("points", "gone1", "--json", check=True).stdout)) == 1
    events = json.loads(env.cli("events", "gone1", "--json", check=True).stdout)
    assert [e["kind"] for e in events][:2] == ["protect", "point"]
    assert events[-1]["level"] == "error" and "no longer exists" in events[-1]["message"]


def test_watch_keeps_replicating_and_stops_cleanly_on_interrupt(labenv: Lab) -> None:
    env = labenv
    env.create_vm("watch1", [("vda", 16 * MiB, "qcow2")])
    env.write("watch1", "vda", 0, MiB, 0x3C)
    env.cli("protect", "watch1", "--from", "src", "--to", "dr", "--rpo", "10s", check=True)
    proc = subprocess.Popen(
        [*STANDBY, "replicate", "--watch", "--interval", "1"],
        env={**os.environ, "STANDBY_HOME": str(env.home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 90
    db = env.home / "state.db"
    while time.monotonic() < deadline:
        time.sleep(1)
        conn = sqlite3.connect(db)
        (n,) = conn.execute(
            "select count(*) from recovery_points p join protections r on r.id = p.protection_id"
            " where r.vm_name = 'watch1'"
        ).fetchone()
        conn.close()
        if n >= 2:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert n >= 2, (out, err)
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err
    status = json.loads(env.cli("status", "--json", check=True).stdout)
    row = next(r for r in status if r["vm"] == "watch1")
    assert row["points"] >= 2
