"""An embedded root whose hosting process died in the middle of a domain start recovers."""

from __future__ import annotations

import subprocess
from pathlib import Path

from standby.plugins.physical.agent import recover_interrupted_starts


def status(name: str, pid: int, job: str) -> str:
    return (
        f"<domstatus state='paused' reason='starting up' pid='{pid}'>\n"
        f"  <job type='none' async='{job}' flags='0x0' asyncStarted='1'/>\n"
        f"  <domain type='qemu'><name>{name}</name></domain>\n</domstatus>\n"
    )


def test_interrupted_start_is_undone_and_other_jobs_are_kept(tmp_path: Path) -> None:
    run = tmp_path / "run" / "qemu"
    run.mkdir(parents=True)
    other = subprocess.Popen(["sleep", "60"])  # alive, but not the guest's QEMU
    try:
        (run / "stuck.xml").write_text(status("stuck", other.pid, "start"))
        (run / "busy.xml").write_text(status("busy", other.pid, "backup"))
        assert recover_interrupted_starts(str(tmp_path)) == ["stuck"]
        assert not (run / "stuck.xml").exists()
        assert (run / "busy.xml").exists(), "a backup job of a running VM is left alone"
        assert other.poll() is None, "a process that is not that guest's QEMU is not killed"
    finally:
        other.kill()
