"""`make demo-vault`'s script, run as a new user would (on the doubles, in a scratch dir)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from support.labenv import REPO


def test_demo_vault_runs_end_to_end() -> None:
    # a short directory: the embedded libvirt's sockets live under it (108-byte limit)
    base = tempfile.mkdtemp(prefix="sbv", dir="/tmp")
    env = {**os.environ, "STANDBY_DEMO_DIR": base}
    proc = subprocess.run(
        ["bash", "scripts/demo-vault.sh"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    shutil.rmtree(base, ignore_errors=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "deduplication and compression" in out and ": ok" in out
    assert "no object name or content mentions app01" in out
    assert "app01: imported with 2 point(s)" in out
    assert "error: wrong passphrase for vault 'dv'\nexit 4" in out
    assert "running as app01-test at 'azure'" in out
    assert "Images are identical." in out and "demo done" in out
