"""`make demo-hyperv`'s script, run as a new user would (on the doubles, in a scratch dir)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support.labenv import REPO


def test_demo_hyperv_runs_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "STANDBY_DEMO_DIR": str(tmp_path)}
    proc = subprocess.run(
        ["bash", "scripts/demo-hyperv.sh"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("Images are identical.") == 1, "the DR disk == the VHDX after failover"
    assert "the drill VM holds the point" in out
    assert "zero data loss" in out and "demo done" in out
