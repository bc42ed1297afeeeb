"""Scripts and health probes of plan runs: a shell in its own process group, TCP and
command probes, and polling until a check passes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .common import one_line, seconds_text

OUTPUT_LIMIT = 64 * 1024
"""Bytes of a script's combined stdout/stderr kept in `RunStep.output` (the tail)."""


@dataclass(frozen=True)
class Done:
    """How a step's action ended: ok, its output, result, error and exit code."""

    ok: bool
    output: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    exit_code: int = 1


@dataclass(frozen=True)
class ShellResult:
    code: int
    output: str
    timed_out: bool


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def read_tail(buf: IO[bytes], limit: int = OUTPUT_LIMIT) -> str:
    size = buf.seek(0, os.SEEK_END)
    buf.seek(max(0, size - limit))
    text = buf.read().decode(errors="replace")
    return ("[... output truncated ...]\n" + text) if size > limit else text


def run_shell(
    command: str,
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    on_spawn: Callable[[int], None] | None = None,
) -> ShellResult:
    """`/bin/sh -c command` in its own process group; the whole group is killed on timeout.

    stdout and stderr go to one temporary file (never a pipe: a background grandchild cannot
    hold the step open), of which the last OUTPUT_LIMIT bytes are returned.
    """
    with tempfile.TemporaryFile() as buf:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=buf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            if on_spawn is not None:
                on_spawn(proc.pid)
            code = proc.wait(timeout=max(timeout, 0.01))
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            code = proc.wait()
            timed_out = True
        except BaseException:
            kill_group(proc.pid)
            proc.wait()
            raise
        return ShellResult(code, read_tail(buf), timed_out)


def last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return one_line(lines[-1])[:200] if lines else ""


def ours(pid: int, run_id: int, key: str) -> bool:
    """Whether `pid` is a script this run's step started (its environment says so)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"STANDBY_RUN={run_id}".encode() in environ and (
        f"STANDBY_STEP={key}".encode() in environ
    )


def tcp_probe(host: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        with socket.create_connection((host, port), timeout=max(timeout, 0.1)):
            return True, f"tcp {host}:{port} open"
    except OSError as exc:
        return False, one_line(str(exc)) or type(exc).__name__


def command_probe(command: str, cwd: Path, env: dict[str, str], left: float) -> tuple[bool, str]:
    res = run_shell(command, cwd, env, max(left, 0.1))
    if res.timed_out:
        return False, "timed out"
    last = last_line(res.output)
    return res.code == 0, f"exit {res.code}" + (f": {last}" if last else "")


def poll_until(
    probe: Callable[[float], tuple[bool, str]],
    who: str,
    target: str,
    timeout: float,
    interval: float,
) -> Done:
    """Probe every `interval` until it passes or `timeout` is over."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    attempts = 0
    while True:
        attempts += 1
        ok, detail = probe(max(deadline - time.monotonic(), 0.1))
        if ok:
            seconds = round(time.monotonic() - t0, 3)
            return Done(True, detail, {"target": target, "attempts": attempts, "seconds": seconds})
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(interval, left))
    error = f"{who}: health check {target} did not pass within {seconds_text(timeout)} ({detail})"
    return Done(False, detail, {"target": target, "attempts": attempts}, error)
