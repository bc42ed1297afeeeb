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
    flat = " ".join(out.split())  # rich wraps long lines at 80 columns without a terminal
    assert "deduplication and compression" in flat and ": ok" in flat
    assert "no object name or content mentions app01" in flat
    assert "app01: imported with 2 point(s)" in flat
    assert "error: wrong passphrase for vault 'dv'" in flat and "exit 4" in flat
    assert "running as app01-test at 'azure'" in flat
    assert "Images are identical." in flat and "demo done" in flat
