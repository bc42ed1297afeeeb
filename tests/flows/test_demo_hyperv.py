"""`make demo-hyperv`'s script, run as a new user would (on the doubles, in a scratch dir)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from support.labenv import REPO


def test_demo_hyperv_runs_end_to_end() -> None:
    # a short directory: the embedded libvirt's sockets live under it (108-byte limit)
    base = tempfile.mkdtemp(prefix="sbd", dir="/tmp")
    env = {**os.environ, "STANDBY_DEMO_DIR": base}
    proc = subprocess.run(
        ["bash", "scripts/demo-hyperv.sh"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    shutil.rmtree(base, ignore_errors=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("Images are identical.") == 1, "the DR disk == the VHDX after failover"
    assert "the drill VM holds the point" in out
    assert "zero data loss" in out and "demo done" in out
    assert "vmm-prod: 1 protected, 2 already protected, 0 refused" in out, "one command"
    assert out.count("the disks are identical") == 2, "VMM DR == prod after failover, failback"
    assert "hashcompare cycle back: wrote 65536 bytes" in out
