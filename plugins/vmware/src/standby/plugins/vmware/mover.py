"""The data mover: qemu-storage-daemon exporting one cycle's replica overlays over NBD.

It runs on the machine that mounts the DR datastore (`datastore_path`), opens each disk's
pending qcow2 overlay (its backing chain from the qcow2 header) and serves them writable on
a unix socket; the engine's threads write through libnbd. A killed standby leaves the daemon
behind: its pid file names it, and the next session of that protection stops it first.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path

from standby.core.errors import PluginError, TransientError

DAEMON = "qemu-storage-daemon"


def unavailable_reason() -> str | None:
    for tool in (DAEMON, "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: qemu-system-common, qemu-utils)"
    return None


def _opt(value: str) -> str:
    """A value inside QEMU's key=value,... option syntax (commas doubled)."""
    return value.replace(",", ",,")


class Mover:
    """One protection's daemon: `start(files)` for a cycle, `stop()` after it."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.sock = workdir / f"{name}.sock"
        self.pidfile = workdir / f"{name}.pid"
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, files: Mapping[str, Path]) -> None:
        self.stop()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sock.unlink(missing_ok=True)
        args = [DAEMON, "--pidfile", str(self.pidfile)]
        for disk, path in files.items():
            args += ["--blockdev", f"driver=file,node-name=f-{disk},filename={_opt(str(path))}"]
            args += ["--blockdev", f"driver=qcow2,node-name={disk},file=f-{disk},discard=unmap"]
        args += ["--nbd-server", f"addr.type=unix,addr.path={_opt(str(self.sock))}"]
        for disk in files:
            args += ["--export", f"type=nbd,id=e-{disk},node-name={disk},name={disk},writable=on"]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + 15
        while not self.sock.exists():
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
                self.proc = None
                raise PluginError(f"data mover did not start: {tail[0]}")
            if time.monotonic() > deadline:
                self.stop()
                raise TransientError("data mover did not open its socket in 15 s")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the daemon (it flushes and closes the overlays on SIGTERM); also a stale one."""
        pid = self.proc.pid if self.proc is not None else self._stale_pid()
        if pid is not None:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            self._wait(pid)
        self.proc = None
        self.pidfile.unlink(missing_ok=True)
        self.sock.unlink(missing_ok=True)

    def _wait(self, pid: int) -> None:
        deadline = time.monotonic() + 30
        while True:
            if self.proc is not None and self.proc.pid == pid:
                if self.proc.poll() is not None:
                    return
            elif not _alive(pid):
                return
            if time.monotonic() > deadline:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    def _stale_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if DAEMON.encode() in cmdline and str(self.sock).encode() in cmdline else None


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
