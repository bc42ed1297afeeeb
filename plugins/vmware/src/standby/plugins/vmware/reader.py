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
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
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
        self._multi: bool | None = None

    def url(self, where: DatastorePath) -> str:
        query = urlencode({"dcPath": self.datacenter, "dsName": where.datastore})
        return f"/folder/{quote(where.path)}?{query}"

    def _open(self, timeout: float = 120) -> http.client.HTTPSConnection:
        """A new connection to vCenter whose certificate passed the pin check."""
        conn = http.client.HTTPSConnection(
            self.opts.host, self.opts.port, context=self.opts.tls(), timeout=timeout
        )
        conn.connect()
        self.opts.check_peer(conn.sock)
        return conn

    def _conn(self) -> http.client.HTTPSConnection:
        conn: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

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

    def read_ranges(self, where: DatastorePath, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several (offset, length) ranges of the file: one multi-range GET where the server
        answers those with multipart/byteranges (probed once, with two 1-byte ranges, on a
        connection dropped unread if it does not), else one GET each."""
        if len(ranges) < 2 or not self._multirange(where):
            return [self.read(where, o, n) for o, n in ranges]
        spec = ",".join(f"{o}-{o + n - 1}" for o, n in ranges)
        status, headers, body = self._request("GET", where, {"Range": f"bytes={spec}"})
        parts = _byteranges(headers.get("content-type", ""), body) if status == 206 else None
        if parts is None:
            raise TransientError(f"datastore file {where}: multi-range GET answered {status}")
        try:  # a short part is the engine's short read (retried)
            return [parts[o][:n] for o, n in ranges]
        except KeyError as exc:
            raise TransientError(f"datastore file {where}: range at {exc} missing") from None

    def _multirange(self, where: DatastorePath) -> bool:
        with self._lock:
            known = self._multi
        if known is not None:
            return known
        ok = False
        conn: http.client.HTTPSConnection | None = None
        try:
            conn = self._open(timeout=60)
            headers = {"Cookie": self.cookie, "Range": "bytes=0-0,2-2"}
            conn.request("GET", self.url(where), headers=headers)
            resp = conn.getresponse()
            ctype = resp.getheader("Content-Type") or ""
            if resp.status == 206 and ctype.startswith("multipart/byteranges"):
                parts = _byteranges(ctype, resp.read())
                ok = parts is not None and set(parts) == {0, 2}
        except (OSError, http.client.HTTPException):
            ok = False
        finally:
            if conn is not None:
                conn.close()  # a server that sent the whole file: dropped, never read
        with self._lock:
            self._multi = ok
        return ok

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


_RANGE = re.compile(rb"content-range:\s*bytes\s+(\d+)-(\d+)/", re.IGNORECASE)


def _byteranges(content_type: str, body: bytes) -> dict[int, bytes] | None:
    """The parts of a multipart/byteranges body by start offset (RFC 9110 14.6), each part's
    length taken from its Content-Range (data may contain the boundary); None if malformed."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/byteranges") or m is None:
        return None
    marker = b"--" + m.group(1).encode()
    out: dict[int, bytes] = {}
    pos = body.find(marker)
    while pos >= 0:
        pos += len(marker)
        if body[pos : pos + 2] == b"--":
            return out
        head_end = body.find(b"\r\n\r\n", pos)
        found = _RANGE.search(body, pos, head_end) if head_end > 0 else None
        if found is None:
            return None
        start, end = int(found.group(1)), int(found.group(2))
        data_at = head_end + 4
        out[start] = body[data_at : data_at + end - start + 1]
        pos = body.find(marker, data_at + end - start + 1)
    return None


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


class VddkReader:
    """Frozen disks served by nbdkit (its vddk plugin), one nbdkit per disk on a unix socket,
    read over NBD with one libnbd handle per engine thread. Lives as long as one snapshot."""

    def __init__(self) -> None:
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def start(self, disk: str, cmd: list[str], sock: Path, timeout: float = 60) -> None:
        """Start nbdkit for one disk; return once its socket answers."""
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs[disk] = (proc, sock)
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                last = (err.strip().splitlines() or ["no output"])[-1]
                raise PluginError(f"nbdkit (VDDK) for disk {disk} did not start: {last}")
            time.sleep(0.02)

    def read(self, disk: str, offset: int, length: int) -> bytes:
        import nbd

        handles: dict[str, Any] = getattr(self._local, "h", None) or {}
        self._local.h = handles
        if disk not in handles:
            h = nbd.NBD()
            h.connect_unix(str(self.procs[disk][1]))
            handles[disk] = h
            with self._lock:
                self._all.append(h)
        try:
            return handles[disk].pread(length, offset)  # type: ignore[no-any-return]
        except nbd.Error as exc:
            raise TransientError(f"disk {disk}: VDDK read at {offset} failed: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            for h in self._all:
                try:
                    h.shutdown()
                except Exception:  # a handle of a dead nbdkit: nothing to shut down
                    pass
            self._all.clear()
        for proc, sock in self.procs.values():
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            sock.unlink(missing_ok=True)
        self.procs.clear()
