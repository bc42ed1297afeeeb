"""Stopping a double's server process by PID: a signal, a wait, then SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_pid(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0
) -> None:
    """Send `sig`, wait up to `timeout` seconds for the exit, then SIGKILL and reap."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_pid(proc)


def kill_pid(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL and reap (a crash, or a server that would not stop)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
