"""VMware sites pointing at a running vcsim double (tests/doubles/vcsim)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

from doubles.vcsim_proc import Vcsim

from standby.core.config import Site
from support.tomlfmt import value as _toml

PASSWORD_ENV = "STANDBY_TEST_VC_PASSWORD"


def site_keys(sim: Vcsim, password_env: str = PASSWORD_ENV, **extra: object) -> dict[str, object]:
    """The keys of a `plugin = "vmware"` site for the double; its password goes by `env:`
    reference, and the variable is set to the double's password."""
    os.environ[password_env] = sim.password
    return {
        "host": sim.host,
        "port": sim.port,
        "user": sim.user,
        "password": f"env:{password_env}",
        "datacenter": sim.datacenter,
        "thumbprint": sim.thumbprint,
        **extra,
    }


def vmware_site(sim: Vcsim, tmp: Path, name: str = "vc", **extra: object) -> Site:
    """A site object for the double (for plugin-level tests)."""
    path = tmp / f"sites/{name}.toml"
    return Site(name=name, plugin="vmware", path=path, raw=site_keys(sim, **extra))


def write_vc_site(home: Path, sim: Vcsim, name: str = "vc", **extra: object) -> None:
    """`sites/NAME.toml` in a standby home for the double; `extra` overrides keys (`port`,
    `datacenter`, `thumbprint`, or `password_env` for another variable)."""
    keys = {"plugin": "vmware", **site_keys(sim, **extra)}
    (home / "sites").mkdir(parents=True, exist_ok=True)
    (home / "sites" / f"{name}.toml").write_text(
        "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())
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
