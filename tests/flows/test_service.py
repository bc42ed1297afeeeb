"""The service on real libvirt: `replicate --watch` holds the embedded roots and serves a
one-shot `standby replicate VM` from another shell; a second watch of the home is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess

from standby.plugins.physical import lab
from support.labenv import STANDBY, Lab, MiB


def test_one_shot_replicate_is_served_by_the_watch(labenv: Lab) -> None:
    env = labenv
    sock = env.base / "svc1.qmp"
    lab.create_vm(
        env.src, "svc1", env.base / "disks", [("vda", 32 * MiB, "qcow2")], qmp_socket=sock
    )
    env.vms.append("svc1")
    device = lab.qdev_path(env.src.lookupByName("svc1"), "vda")
    env.cli("protect", "svc1", "--from", "src", "--to", "dr", "--rpo", "1h", check=True)
    env.release()
    watch = subprocess.Popen(
        [*STANDBY, "replicate", "svc1", "--watch", "--json", "--interval", "1"],
        env={**os.environ, "STANDBY_HOME": str(env.home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        first = json.loads(watch.stdout.readline())  # the initial sync, by the watch
        assert first["vm"] == "svc1" and first["kind"] == "full"

        writer = lab.QmpWriter(sock)  # the guest writes while the watch holds the root
        writer.qemu_io(device, f"write -q -P 0x5e {4 * MiB} 65536")
        writer.io_done()
        writer.close()
        served = env.cli("replicate", "svc1", "--json", check=True)
        (report,) = json.loads(served.stdout)
        assert report["served_by"] == watch.pid
        assert report["kind"] == "incremental" and report["bytes_written"] == 65536

        again = env.cli("replicate", "--watch")
        assert again.returncode == 8 and "already runs" in again.stderr
        gone = env.cli("replicate", "ghost")
        assert gone.returncode == 3 and gone.stderr.startswith("error: VM 'ghost'")
    finally:
        watch.send_signal(signal.SIGINT)
        _out, err = watch.communicate(timeout=60)
    assert watch.returncode == 130, err
    assert not (env.home / "run" / "standby.sock").exists()
    cold = env.cli("replicate", "svc1", "--json", check=True)
    (report,) = json.loads(cold.stdout)
    assert "served_by" not in report and report["bytes_written"] == 0
