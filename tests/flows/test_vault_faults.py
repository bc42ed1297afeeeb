"""A vault under kill -9 (cycles and sweeps killed at random points, 20 trials) and with its
store gone for a while mid-cycle: nothing lost, `vault check --read-data` clean."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from standby.core.config import Policy
from standby.plugins.physical import lab as lab_mod
from support.labenv import STANDBY, Lab, MiB, write_site

ENV = {"SB_VAULT_PASS": "kill trials"}
TRIALS = 20


@pytest.fixture(scope="module")
def lab(labenv: Lab) -> Lab:
    os.environ.update(ENV)
    labenv.cli("vault", "create", "kv", "--store", f"file://{labenv.base}/kstore",
               "--passphrase", "env:SB_VAULT_PASS", check=True, env=ENV)  # fmt: skip
    write_site(labenv.home, "kv", 'plugin = "vault"\nvault = "kv"\n')
    return labenv


def _killed(env: Lab, args: list[str], after: float) -> None:
    full = {**os.environ, "STANDBY_HOME": str(env.home), **ENV}
    p = subprocess.Popen([*STANDBY, *args], env=full, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        p.wait(timeout=after)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _check_clean(env: Lab) -> dict[str, object]:
    r = env.cli("vault", "check", "kv", "--read-data", "--json", env=ENV)
    rep: dict[str, object] = json.loads(r.stdout)
    assert r.returncode == 0 and rep["ok"], rep["problems"]
    return rep


def _restored_equals(env: Lab, vm: str) -> bool:
    raw = env.base / f"{vm}.k.raw"
    env.cli("vault", "restore-disk", "kv", vm, "vda", "--out", str(raw), check=True, env=ENV)
    env.flush(vm, "vda")
    try:
        return lab_mod.images_equal(env.disk_path(vm, "vda"), raw, fmt_b="raw")
    finally:
        raw.unlink()


def test_kill_9_at_random_points_of_cycles_and_sweeps_loses_nothing(lab: Lab) -> None:
    env = lab
    rng = random.Random(12)
    env.create_vm("kt1", [("vda", 24 * MiB, "qcow2")])
    env.write("kt1", "vda", 0, 12 * MiB, 0x31)
    env.engine.protect("kt1", "src", "kv", Policy(retain_count=2))
    env.release()
    for trial in range(TRIALS):
        for _ in range(4):
            env.write("kt1", "vda", rng.randrange(0, 24 * MiB // 65536) * 65536, 65536,
                      rng.randrange(1, 255))  # fmt: skip
        env.release()
        if trial % 4 == 3:
            _killed(env, ["vault", "sweep", "kv"], rng.uniform(0.6, 1.6))
        else:
            _killed(env, ["replicate", "kt1"], rng.uniform(0.5, 2.5))
    env.cli("replicate", "kt1", check=True, env=ENV, timeout=120)
    rep = _check_clean(env)
    assert not rep["damaged_points"]
    assert _restored_equals(env, "kt1")
    env.cli("vault", "sweep", "kv", check=True, env=ENV)
    assert not _check_clean(env)["garbage_packs"]


def test_a_store_gone_mid_cycle_is_retried_and_leaves_no_half_point(lab: Lab) -> None:
    env = lab
    env.create_vm("kt2", [("vda", 16 * MiB, "qcow2")])
    env.write("kt2", "vda", 0, 8 * MiB, 0x52)
    env.engine.protect("kt2", "src", "kv", Policy(retain_count=2))
    store = env.base / "kstore"
    packs = store / "packs"
    moved = packs.with_name("packs.away")
    packs.mkdir(exist_ok=True)
    # the store's pack folder vanishes as the cycle starts and comes back 2 s later
    packs.rename(moved)
    (store / "packs").write_text("not a folder")  # writes under packs/ now fail
    timer = threading.Timer(2.0, lambda: ((store / "packs").unlink(), moved.rename(packs)))
    timer.start()
    try:
        started = time.monotonic()
        report = env.engine.replicate("kt2")
    finally:
        timer.join()
    assert time.monotonic() - started >= 2.0 and report.kind == "full"
    env.release()
    _check_clean(env)
    assert _restored_equals(env, "kt2")
