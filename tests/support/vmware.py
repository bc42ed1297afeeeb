"""VMware sites pointing at a running vcsim double (tests/doubles/vcsim)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

from doubles.vcsim_proc import Vcsim

from standby.core.config import Site

PASSWORD_ENV = "STANDBY_TEST_VC_PASSWORD"


def vmware_site(sim: Vcsim, tmp: Path, name: str = "vc", **extra: object) -> Site:
    """A `plugin = "vmware"` site for the double; its password goes by `env:` reference."""
    os.environ[PASSWORD_ENV] = sim.password
    raw: dict[str, object] = {
        "host": sim.host,
        "port": sim.port,
        "user": sim.user,
        "password": f"env:{PASSWORD_ENV}",
        "datacenter": sim.datacenter,
        "thumbprint": sim.thumbprint,
        **extra,
    }
    return Site(name=name, plugin="vmware", path=tmp / f"sites/{name}.toml", raw=raw)


def write_vc_site(
    home: Path,
    sim: Vcsim,
    name: str = "vc",
    *,
    port: int | None = None,
    password_env: str = PASSWORD_ENV,
    datacenter: str | None = None,
    thumbprint: str | None = None,
) -> None:
    """`sites/NAME.toml` in a standby home for the double (password by `env:` reference)."""
    os.environ.setdefault(password_env, sim.password)
    (home / "sites").mkdir(parents=True, exist_ok=True)
    (home / "sites" / f"{name}.toml").write_text(
        f'plugin = "vmware"\nhost = "{sim.host}"\nport = {port or sim.port}\n'
        f'user = "{sim.user}"\npassword = "env:{password_env}"\n'
        f'datacenter = "{datacenter or sim.datacenter}"\n'
        f'thumbprint = "{thumbprint or sim.thumbprint}"\n'
    )


def vmdk_files(sim: Vcsim, vm: str) -> dict[str, Path]:
    """Each disk's backing flat file, by standby's disk name."""
    return {f"disk{d['deviceKey']}": Path(d["file"]) for d in sim.disks(vm)}


class CuttingProxy:
    """A TCP forwarder in front of the double that drops every connection once, after
    `cut_after` bytes came back from the server: vCenter gone in the middle of a cycle."""

    def __init__(self, port: int, cut_after: int) -> None:
        self.upstream = port
        self.cut_after = cut_after
        self.sent = 0
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._open += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if counted:
                    self._count(len(data))
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _count(self, n: int) -> None:
        with self._lock:
            self.sent += n
            if self.cuts or self.sent < self.cut_after:
                return
            self.cuts += 1
            doomed, self._open = self._open, []
        for s in doomed:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            doomed, self._open = self._open, []
        for s in doomed:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
