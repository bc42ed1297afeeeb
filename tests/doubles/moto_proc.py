"""Start and stop the AWS double (serve_moto.py) as a child process, and drive its shim."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doubles.certs import make_cert
from doubles.procs import stop_pid

SERVE = Path(__file__).with_name("serve_moto.py")
ACCESS_KEY = "standby-test-key-id"
SECRET_KEY = "standby-test-secret-for-the-aws-double"
"""The double's keys: refused keys are any others (it checks the key id only)."""


@dataclass
class Moto:
    """A running AWS double: `url` for endpoint_url, `cert` to pin."""

    proc: subprocess.Popen[bytes]
    base: Path
    port: int
    cert: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _open(self, path: str, data: bytes | None = None, method: str = "GET") -> Any:
        ctx = ssl.create_default_context(cafile=str(self.cert))
        req = urllib.request.Request(self.url + path, data=data, method=method)
        return urllib.request.urlopen(req, context=ctx, timeout=120)

    def write(self, volume: str, offset: int, data: bytes) -> None:
        """Write into a volume as the instance's guest would."""
        with self._open(f"/_standby/write?volume={volume}&offset={offset}", data, "POST"):
            pass

    def image(self, length: int, offset: int = 0, *, volume: str = "", snapshot: str = "") -> bytes:
        """Bytes of a volume or a completed snapshot."""
        what = f"volume={volume}" if volume else f"snapshot={snapshot}"
        with self._open(f"/_standby/image?{what}&offset={offset}&length={length}") as r:
            data: bytes = r.read()
        return data

    def blocks(self, *, volume: str = "", snapshot: str = "") -> list[int]:
        """Indexes of the 512 KiB blocks a volume or snapshot holds (the rest reads as zeroes)."""
        what = f"volume={volume}" if volume else f"snapshot={snapshot}"
        with self._open(f"/_standby/blocks?{what}") as r:
            held: list[int] = json.loads(r.read())["blocks"]
        return held

    def save_image(self, path: Path, length: int, *, volume: str = "", snapshot: str = "") -> Path:
        """A volume's or snapshot's first `length` bytes into a sparse raw file (only the
        blocks it holds are fetched)."""
        block = 512 * 1024
        with path.open("wb") as out:
            out.truncate(length)
            for idx in self.blocks(volume=volume, snapshot=snapshot):
                start = idx * block
                if start >= length:
                    break
                data = self.image(
                    min(block, length - start), start, volume=volume, snapshot=snapshot
                )
                out.seek(start)
                out.write(data)
        return path

    def fault(self, action: str, code: str, count: int = 1, status: int = 400) -> None:
        """Answer the next `count` calls of `action` (`*`: any) with error `code`."""
        q = f"action={action}&code={code}&count={count}&status={status}"
        with self._open(f"/_standby/fault?{q}", b"", "POST"):
            pass

    def clear_faults(self) -> None:
        with self._open("/_standby/fault?clear=1", b"", "POST"):
            pass

    def stats(self) -> dict[str, Any]:
        with self._open("/_standby/stats") as r:
            doc: dict[str, Any] = json.loads(r.read())
        return doc

    def pause(self) -> None:
        """Stop answering (the server stopped mid-cycle), without losing state."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        stop_pid(self.proc, signal.SIGTERM, 10)


def start_moto(base: Path, timeout: float = 60.0) -> Moto:
    """Start serve_moto.py over HTTPS on a free 127.0.0.1 port with a certificate made now."""
    base.mkdir(parents=True, exist_ok=True)
    cert, _key = make_cert(base / "tls")
    (base / "port").unlink(missing_ok=True)
    log = (base / "moto.log").open("wb")
    env = {**os.environ, "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}
    proc = subprocess.Popen(
        [sys.executable, str(SERVE), "--dir", str(base), "--access-key", ACCESS_KEY],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    log.close()
    deadline = time.monotonic() + timeout
    while not (base / "port").exists():
        if proc.poll() is not None:
            raise RuntimeError(
                f"moto exited with {proc.returncode}: {(base / 'moto.log').read_text()}"
            )
        if time.monotonic() > deadline:
            stop_pid(proc)
            raise TimeoutError(f"moto did not start: {(base / 'moto.log').read_text()}")
        time.sleep(0.05)
    port = int((base / "port").read_text())
    return Moto(proc, base, port, cert)
