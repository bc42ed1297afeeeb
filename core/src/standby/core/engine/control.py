"""The service's control socket: a running `replicate --watch` serves one-shot cycles.

`standby replicate --watch` is how standby runs in production: one process that keeps every
protection within its RPO and holds the plugins' connections (an embedded libvirt root can
be held by one process only). It listens on `$STANDBY_HOME/run/standby.sock` (mode 0600,
owner only), and `standby replicate VM` from any shell hands the cycle to it instead of
starting a second engine: the command then costs a socket round trip plus a warm cycle.

Protocol: one JSON object per line each way, one request per connection.
  {"op": "replicate", "vm": "web01", "wait": false}
    -> {"ok": true, "report": {...CycleReport...}, "summary": "...", "served_by": PID}
    -> {"ok": false, "error": "one line", "exit_code": 3}
  {"op": "ping"} -> {"ok": true, "served_by": PID}
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

from standby.core.errors import Busy, ConfigError, StandbyError

from .report import CycleReport

SOCKET = Path("run") / "standby.sock"
MAX_REQUEST = 64 * 1024


def socket_path(home: Path) -> Path:
    """Where the service of a standby home listens."""
    return home / SOCKET


class ControlServer:
    """Accepts requests on the home's socket; each is served in its own thread."""

    def __init__(
        self,
        home: Path,
        replicate: Callable[[str, bool, Callable[[CycleReport], None]], CycleReport],
    ) -> None:
        self.path = socket_path(home)
        self.replicate = replicate
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen, or raise Busy when another service of this home is listening."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if _answers(self.path):
                raise Busy(f"a standby service already runs for this home ({self.path})")
            self.path.unlink()  # left by a process that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(16)
        self.sock = sock
        self.thread = threading.Thread(target=self._accept, name="standby-control", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.sock is not None:
            with suppress(OSError):
                self.path.unlink()
            self.sock.close()
            self.sock = None

    def _accept(self) -> None:
        while self.sock is not None:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by stop()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            answered = threading.Event()

            def answer(reply: dict[str, Any]) -> None:
                if not answered.is_set():
                    answered.set()
                    with suppress(OSError):
                        f.write(json.dumps(reply, default=str).encode() + b"\n")
                        f.flush()
                        conn.shutdown(socket.SHUT_WR)  # the asker reads its answer now

            try:
                req = json.loads(f.readline(MAX_REQUEST) or b"{}")
                if not isinstance(req, dict):
                    raise TypeError(req)
            except (ValueError, TypeError):
                answer({"ok": False, "error": "malformed request", "exit_code": 2})
                return
            answer(self._handle(req, answer))

    def _handle(
        self, req: dict[str, Any], answer: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        """The reply to one request; a cycle's success is answered as soon as its point is
        visible (`answer`), before the cycle's housekeeping."""
        served = {"served_by": os.getpid()}
        op = req.get("op")
        if op == "ping":
            return {"ok": True, **served}
        if op != "replicate" or not isinstance(req.get("vm"), str):
            error = ConfigError(f"unknown request {op!r}")
            return {"ok": False, "error": str(error), "exit_code": error.exit_code}

        def point(report: CycleReport) -> None:
            answer({"ok": True, "report": asdict(report), "summary": report.summary(), **served})

        try:
            report = self.replicate(req["vm"], bool(req.get("wait")), point)
        except StandbyError as exc:
            return {"ok": False, "error": str(exc), "exit_code": exc.exit_code, **served}
        return {"ok": True, "report": asdict(report), "summary": report.summary(), **served}


def _answers(path: Path) -> bool:
    """Whether a live process listens on the socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(str(path))
        s.sendall(b'{"op": "ping"}\n')
        return bool(s.recv(1))
    except OSError:
        return False
    finally:
        s.close()
