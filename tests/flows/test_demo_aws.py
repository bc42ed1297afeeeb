"""`make demo-aws`'s script, run as a new user would (on the doubles, in a scratch dir)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from support.labenv import REPO


def test_demo_aws_runs_end_to_end() -> None:
    # a short directory: the embedded libvirt's sockets live under it (108-byte limit)
    base = tempfile.mkdtemp(prefix="sbd", dir="/tmp")
    env = {**os.environ, "STANDBY_DEMO_DIR": base}
    proc = subprocess.run(
        ["bash", "scripts/demo-aws.sh"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    shutil.rmtree(base, ignore_errors=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "incremental cycle: read 1048576 bytes (two 512 KiB EBS blocks)" in out
    assert "Images are identical." in out, "the failed-over volume equals the source disk"
    assert "hashcompare cycle:" in out and "wrote 65536 home" in out
    assert "ok vda.qcow2 157286400+65536 = 0x99" in out and "demo done" in out
