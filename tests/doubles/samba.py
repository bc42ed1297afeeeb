"""Samba from Debian on a loopback port: the SMB file share a Hyper-V host's disks are read
through. Config, passdb, locks and logs live in the work directory; stopped by PID."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from doubles.procs import stop_pid

SHARE = "vms"


@dataclass
class Samba:
    port: int
    share: str
    path: Path
    user: str
    password: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 10.0) -> None:
        stop_pid(self.proc, signal.SIGTERM, timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_samba(workdir: Path, share_dir: Path, password: str = "Sm8-pass!") -> Samba:
    """smbd serving `share_dir` as `\\\\127.0.0.1\\vms` to user root (the unix account the
    share runs as), SMB3 with encryption available; returns once the port answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    share_dir.mkdir(parents=True, exist_ok=True)
    dirs = {k: workdir / k for k in ("private", "lock", "state", "cache", "pid")}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    port = _free_port()
    log = workdir / "smbd.log"
    conf = workdir / "smb.conf"
    conf.write_text(
        "[global]\n"
        f"smb ports = {port}\nbind interfaces only = yes\ninterfaces = 127.0.0.1\n"
        "server role = standalone server\ndisable netbios = yes\n"
        f"private dir = {dirs['private']}\nlock directory = {dirs['lock']}\n"
        f"state directory = {dirs['state']}\ncache directory = {dirs['cache']}\n"
        f"pid directory = {dirs['pid']}\npassdb backend = tdbsam:{dirs['private']}/passdb.tdb\n"
        f"log file = {log}\nlog level = 1\nload printers = no\nprinting = bsd\n"
        "printcap name = /dev/null\ndisable spoolss = yes\nserver min protocol = SMB3\n"
        f"[{SHARE}]\npath = {share_dir}\nread only = no\nvalid users = root\n"
    )
    subprocess.run(
        ["smbpasswd", "-c", str(conf), "-a", "-s", "root"],
        input=f"{password}\n{password}\n".encode(), check=True, capture_output=True,
    )  # fmt: skip
    # Its own session: smbd signals its whole process group when it stops, which would
    # otherwise be the test run's.
    proc = subprocess.Popen(
        ["smbd", "--foreground", "--no-process-group", "-s", str(conf)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"smbd did not start: {tail}") from None
            time.sleep(0.05)
    return Samba(port, SHARE, share_dir, "root", password, proc, log)
