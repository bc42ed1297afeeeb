"""A file on an SMB share as a `pread` source (smbprotocol): how a Hyper-V host's VHDX files
are read where standby runs. SMB 3 with encryption required and signing as the server asks;
reads are split at the server's maximum read size."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from standby.core.errors import AuthError, NotFound, PluginError, TransientError


class SmbFile:
    """`\\\\host\\share\\path` opened for reading."""

    def __init__(
        self, host: str, share: str, path: str, user: str, password: str, port: int = 445
    ) -> None:
        from smbprotocol.connection import Connection
        from smbprotocol.exceptions import LogonFailure, ObjectNameNotFound, SMBException
        from smbprotocol.session import Session
        from smbprotocol.tree import TreeConnect

        self.where = f"\\\\{host}\\{share}\\{path}"
        self._lock = threading.Lock()
        self.conn: Any = Connection(uuid.uuid4(), host, port)
        try:
            self.conn.connect(timeout=30)
            session = Session(self.conn, user, password, require_encryption=True)
            session.connect()
            tree = TreeConnect(session, f"\\\\{host}\\{share}")
            tree.connect()
            self.file = self._open(tree, path)
        except LogonFailure:
            self.close()
            raise AuthError(f"SMB {host}: login failed for user '{user}'") from None
        except ObjectNameNotFound:
            self.close()
            raise NotFound(f"{self.where} not found") from None
        except (SMBException, OSError, ValueError) as exc:
            self.close()
            raise TransientError(f"{self.where}: {exc}") from exc
        # One MiB a request: 16 credits, which every server grants a fresh session.
        self.max_read = min(int(self.conn.max_read_size), 1 << 20)

    @staticmethod
    def _open(tree: Any, path: str) -> Any:
        from smbprotocol.open import (
            CreateDisposition,
            CreateOptions,
            FileAttributes,
            FilePipePrinterAccessMask,
            ImpersonationLevel,
            Open,
            ShareAccess,
        )

        f = Open(tree, path)
        f.create(
            ImpersonationLevel.Impersonation,
            FilePipePrinterAccessMask.GENERIC_READ,
            FileAttributes.FILE_ATTRIBUTE_NORMAL,
            ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE,
            CreateDisposition.FILE_OPEN,
            CreateOptions.FILE_NON_DIRECTORY_FILE,
        )
        return f

    @property
    def size(self) -> int:
        return int(self.file.end_of_file)

    def pread(self, length: int, offset: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer at the end of the file), its SMB requests
        in flight together."""
        return self.pread_many([(offset, length)])[0]

    def pread_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """(offset, length) ranges read with their requests in flight together on this
        connection (as many as its credits allow), instead of one round trip each."""
        from smbprotocol.exceptions import SMBException

        pieces: list[tuple[int, int, int]] = []  # (range index, offset, length) per request
        for i, (offset, length) in enumerate(ranges):
            end = min(offset + length, self.size)
            pieces += [
                (i, o, min(self.max_read, end - o)) for o in range(offset, end, self.max_read)
            ]
        out: list[list[bytes]] = [[] for _ in ranges]
        tree = self.file.tree_connect
        sid, tid = tree.session.session_id, tree.tree_connect_id
        try:
            with self._lock:
                at = 0
                while at < len(pieces):
                    window = self.conn.sequence_window
                    credits = max(1, int(window["high"]) - int(window["low"]))
                    sent: list[tuple[int, int, Any, Any]] = []
                    used = 0
                    while at < len(pieces):
                        i, offset, n = pieces[at]
                        charge = -(-n // 65536)
                        if sent and used + charge > credits:
                            break
                        msg, receive = self.file.read(offset, n, send=False)
                        request = self.conn.send(msg, sid, tid)
                        sent.append((i, n, request, receive))
                        used, at = used + charge, at + 1
                    for i, n, request, receive in sent:
                        data = receive(request)
                        if len(data) != n:
                            raise SMBException(f"short read ({len(data)} of {n} bytes)")
                        out[i].append(data)
        except (SMBException, OSError) as exc:
            raise TransientError(f"{self.where}: batched read failed: {exc}") from exc
        return [parts[0] if len(parts) == 1 else b"".join(parts) for parts in out]

    def close(self) -> None:
        try:
            self.conn.disconnect(True)
        except Exception:  # closing a connection that never opened, or is gone
            pass


def check_path(path: str) -> str:
    """A share-relative path as SMB wants it (backslashes, no leading one)."""
    clean = path.replace("/", "\\").lstrip("\\")
    if not clean or ".." in clean.split("\\"):
        raise PluginError(f"not a path inside a share: {path!r}")
    return clean


class SmbPool:
    """Up to `size` connections to one file, lent to reading threads in turn: the engine's
    reads of a disk are in flight together instead of queueing on one connection."""

    def __init__(self, opener: Any, size: int) -> None:
        self._opener, self._size = opener, max(1, size)
        self._idle: list[SmbFile] = []
        self._all: list[SmbFile] = []
        self._cond = threading.Condition()
        self._opening = 0
        first = opener()
        self._all.append(first)
        self._idle.append(first)
        self.where, self.size = first.where, first.size

    def _borrow(self) -> SmbFile:
        with self._cond:
            while not self._idle and len(self._all) + self._opening >= self._size:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._opening += 1
        try:
            f: SmbFile = self._opener()
        finally:
            with self._cond:
                self._opening -= 1
                self._cond.notify()
        with self._cond:
            self._all.append(f)
        return f

    def pread(self, length: int, offset: int) -> bytes:
        f = self._borrow()
        try:
            return f.pread(length, offset)
        finally:
            with self._cond:
                self._idle.append(f)
                self._cond.notify()

    def pread_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        f = self._borrow()
        try:
            return f.pread_many(ranges)
        finally:
            with self._cond:
                self._idle.append(f)
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            files, self._all, self._idle = self._all, [], []
        for f in files:
            if isinstance(f, SmbFile):
                f.close()
