"""Start and stop standby-vcsim (govmomi's vCenter simulator plus a CBT front) for tests.

Build the binary first with ``bash scripts/build-vcsim.sh`` (``make setup`` does it).
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import signal
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doubles.procs import kill_pid, stop_pid

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / ".cache" / "vcsim" / "standby-vcsim"


@dataclass
class Vcsim:
    """A running simulator; ``url`` is the SOAP endpoint ``https://127.0.0.1:PORT/sdk``."""

    url: str
    host: str
    port: int
    cert: Path
    thumbprint: str
    user: str
    password: str
    datacenter: str
    datastore: str
    dir: Path
    proc: subprocess.Popen[bytes]
    datastore_dir: Path | None = None
    log: Path | None = None
    _ctx: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only this simulator's certificate."""
        if self._ctx is None:
            self._ctx = ssl.create_default_context(cafile=str(self.cert))
        return self._ctx

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"https://{self.host}:{self.port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10, context=self.ssl_context) as res:
            return json.loads(res.read() or b"null")

    def write(self, vm: str, disk_key: int, offset: int, data: bytes) -> int:
        """Write ``data`` into the disk's flat file at ``offset``, as a guest would; returns seq."""
        body = {
            "vm": vm,
            "disk": disk_key,
            "offset": offset,
            "data": base64.b64encode(data).decode(),
        }
        return int(self._call("POST", "/standby/write", body)["seq"])

    def reset_cbt(self, vm: str, disk_key: int) -> None:
        """Give the disk a new CBT identity: every older changeId becomes invalid."""
        self._call("POST", "/standby/reset-cbt", {"vm": vm, "disk": disk_key})

    def disks(self, vm: str) -> list[dict[str, Any]]:
        """The VM's disks: deviceKey, file, datastorePath, capacityBytes, changeId, cbtEnabled."""
        result: list[dict[str, Any]] = self._call(
            "GET", "/standby/disks?" + urllib.parse.urlencode({"vm": vm})
        )
        return result

    def set_free(self, free_bytes: int) -> None:
        """Make vCenter report `free_bytes` free on the datastore (a full datastore)."""
        self._call("POST", "/standby/datastore", {"freeBytes": free_bytes})

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, wait ``timeout`` seconds, then SIGKILL."""
        stop_pid(self.proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL by PID (simulates a crash)."""
        kill_pid(self.proc)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError("standby-vcsim printed no ready line")
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
    return buf.split(b"\n", 1)[0]


def start_vcsim(
    workdir: Path,
    vms: int = 2,
    *,
    disk_mb: int = 64,
    page_areas: int = 2000,
    page_bytes: int = 1 << 30,
    timeout: float = 30.0,
) -> Vcsim:
    """Start standby-vcsim with its datastore under ``workdir`` and wait for its ready line."""
    if not BINARY.exists():
        raise RuntimeError(f"{BINARY} is missing: run `make setup` (scripts/build-vcsim.sh)")
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "vcsim.log"
    args = [str(BINARY), "-dir", str(workdir), "-vms", str(vms), "-disk-mb", str(disk_mb)]
    args += ["-page-areas", str(page_areas), "-page-bytes", str(page_bytes)]
    with log.open("wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    try:
        line = _read_line(proc, timeout)
        if not line:
            raise RuntimeError(f"standby-vcsim exited early: {log.read_text()[-2000:]}")
        info = json.loads(line)
    except BaseException:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    finally:
        assert proc.stdout is not None
        proc.stdout.close()
    return Vcsim(
        url=info["url"],
        host="127.0.0.1",
        port=int(info["port"]),
        cert=Path(info["cert"]),
        thumbprint=info["thumbprint"],
        user=info["user"],
        password=info["password"],
        datacenter=info["datacenter"],
        datastore=info["datastore"],
        dir=Path(info["dir"]),
        proc=proc,
        datastore_dir=Path(info["datastoreDir"]) if info.get("datastoreDir") else None,
        log=log,
    )
