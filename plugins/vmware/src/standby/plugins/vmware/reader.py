"""Disk readers: how a snapshot's frozen disk bytes come off a datastore.

`HttpFlatReader` (the default) reads the snapshot's base `-flat.vmdk` with ranged GETs
through the datastore file service (`/folder/...`), one keep-alive HTTPS connection per
engine thread. It can read a disk only while standby's snapshot is the VM's only one (the base
file is then exactly the frozen disk); other snapshots make the frozen disk a delta chain, and
the reader refuses. `vddk_command` builds the nbdkit + VDDK command line production vSphere
uses (VDDK is VMware's proprietary library: it cannot be installed here).
"""

from __future__ import annotations

import http.client
import re
import threading
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from standby.core.errors import NotFound, PluginError, TransientError

from .conn import VMwareOptions

_DS_PATH = re.compile(r"^\[(?P<ds>[^\]]+)\]\s*(?P<path>.+)$")


@dataclass(frozen=True)
class DatastorePath:
    """`[datastore] folder/file.vmdk`, split."""

    datastore: str
    path: str

    @classmethod
    def parse(cls, text: str) -> DatastorePath:
        m = _DS_PATH.match(text.strip())
        if not m:
            raise PluginError(f"not a datastore path: {text!r}")
        return cls(m.group("ds"), m.group("path").strip())

    def flat(self) -> DatastorePath:
        """The data extent of a flat disk's descriptor (`x.vmdk` -> `x-flat.vmdk`)."""
        if self.path.endswith("-flat.vmdk") or not self.path.endswith(".vmdk"):
            return self
        return DatastorePath(self.datastore, self.path[: -len(".vmdk")] + "-flat.vmdk")

    def __str__(self) -> str:
        return f"[{self.datastore}] {self.path}"


class HttpFlatReader:
    """Ranged GETs of flat disk files through the datastore file service."""

    def __init__(self, opts: VMwareOptions, datacenter: str, cookie: str) -> None:
        self.opts = opts
        self.datacenter = datacenter
        self.cookie = cookie
        self._local = threading.local()
        self._all: list[http.client.HTTPSConnection] = []
        self._lock = threading.Lock()

    def url(self, where: DatastorePath) -> str:
        query = urlencode({"dcPath": self.datacenter, "dsName": where.datastore})
        return f"/folder/{quote(where.path)}?{query}"

    def _conn(self) -> http.client.HTTPSConnection:
        conn: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(
                self.opts.host, self.opts.port, context=self.opts.tls(), timeout=120
            )
            conn.connect()
            self.opts.check_peer(conn.sock)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def size(self, where: DatastorePath) -> int | None:
        """The file's size, or None when it does not exist."""
        status, headers, _ = self._request("HEAD", where, {})
        if status == 404:
            return None
        if status != 200:
            raise PluginError(f"datastore file {where}: HTTP {status}")
        return int(headers.get("content-length", "0"))

    def read(self, where: DatastorePath, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` of the file."""
        rng = {"Range": f"bytes={offset}-{offset + length - 1}"}
        status, _, body = self._request("GET", where, rng)
        if status == 404:
            raise NotFound(f"datastore file {where} not found")
        if status not in (200, 206) or len(body) != length:
            raise TransientError(
                f"datastore file {where}: HTTP {status}, {len(body)} of {length} bytes"
            )
        return body

    def _request(
        self, method: str, where: DatastorePath, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on this thread's connection (reopened once if the server closed it)."""
        for attempt in (1, 2):
            try:
                conn = self._conn()
                conn.request(method, self.url(where), headers={"Cookie": self.cookie, **headers})
                resp = conn.getresponse()
                body = resp.read()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                if attempt == 2:
                    raise TransientError(f"datastore file {where}: {exc}") from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


def vddk_command(
    opts: VMwareOptions,
    *,
    socket_path: str,
    vm_moref: str,
    snapshot_moref: str,
    disk: DatastorePath,
    password_file: str,
    sha1_thumbprint: str,
) -> list[str]:
    """The nbdkit command that serves one frozen disk over a unix socket through VDDK.

    The password goes by file (`password=+FILE`), never on the command line; VDDK pins the
    server by its SHA-1 thumbprint (its own rule), which `probe` reads from the same
    certificate the SHA-256 pin accepted."""
    if not opts.vddk_libdir:
        raise PluginError("vddk_libdir is not set")
    return [
        "nbdkit",
        "--readonly",
        "--exit-with-parent",
        "--unix",
        socket_path,
        "vddk",
        f"libdir={opts.vddk_libdir}",
        f"server={opts.host}",
        f"port={opts.port}",
        f"user={opts.user}",
        f"password=+{password_file}",
        f"thumbprint={sha1_thumbprint}",
        f"vm=moref={vm_moref}",
        f"snapshot={snapshot_moref}",
        "transports=nbdssl:nbd",
        f"file={disk}",
    ]
