"""Files on an SMB share (smbprotocol): how a Hyper-V host's VHDX files are read, and the DR
host's replica files written, where standby runs. SMB 3 with encryption required and signing
as the server asks; reads and writes are split at the server's maximum sizes and pipelined
within the connection's credits. `SmbShare` does the file management (folders, deletes,
renames) through smbclient."""

from __future__ import annotations

import errno
import threading
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from standby.core.errors import AuthError, NotFound, PluginError, TransientError


class SmbFile:
    """`\\\\host\\share\\path` opened for reading (or, `write`, for reading and writing;
    `create` makes it when missing)."""

    def __init__(
        self,
        host: str,
        share: str,
        path: str,
        user: str,
        password: str,
        port: int = 445,
        write: bool = False,
        create: bool = False,
    ) -> None:
        from smbprotocol.connection import Connection
        from smbprotocol.exceptions import LogonFailure, ObjectNameNotFound, SMBException
        from smbprotocol.session import Session
        from smbprotocol.tree import TreeConnect

        self.where = f"\\\\{host}\\{share}\\{path}"
        self._lock = threading.Lock()
        self._key: TreeKey = (host, port, share, user, password)
        tree = TREES.take(self._key)
        if tree is not None:
            try:
                self.file = self._open(tree, path, write, create)
                self.conn: Any = tree.session.connection
            except ObjectNameNotFound:
                TREES.give(self._key, tree)
                raise NotFound(f"{self.where} not found") from None
            except (SMBException, OSError, ValueError):
                _disconnect(tree)  # gone while idle: a fresh connection below
                tree = None
        if tree is None:
            self.conn = Connection(uuid.uuid4(), host, port)
            try:
                self.conn.connect(timeout=30)
                session = Session(self.conn, user, password, require_encryption=True)
                session.connect()
                tree = TreeConnect(session, f"\\\\{host}\\{share}")
                tree.connect()
                self.file = self._open(tree, path, write, create)
            except LogonFailure:
                self.close()
                raise AuthError(f"SMB {host}: login failed for user '{user}'") from None
            except ObjectNameNotFound:
                self.close()
                raise NotFound(f"{self.where} not found") from None
            except (SMBException, OSError, ValueError) as exc:
                self.close()
                raise TransientError(f"{self.where}: {exc}") from exc
        self._tree: Any = tree
        # One MiB a request: 16 credits, which every server grants a fresh session.
        self.max_read = min(int(self.conn.max_read_size), 1 << 20)
        self.max_write = min(int(self.conn.max_write_size), 1 << 20)
        self._size = int(self.file.end_of_file)

    @staticmethod
    def _open(tree: Any, path: str, write: bool = False, create: bool = False) -> Any:
        from smbprotocol.open import (
            CreateDisposition,
            CreateOptions,
            FileAttributes,
            FilePipePrinterAccessMask,
            ImpersonationLevel,
            Open,
            ShareAccess,
        )

        access = FilePipePrinterAccessMask.GENERIC_READ
        if write:
            access |= FilePipePrinterAccessMask.GENERIC_WRITE
        f = Open(tree, path)
        f.create(
            ImpersonationLevel.Impersonation,
            access,
            FileAttributes.FILE_ATTRIBUTE_NORMAL,
            ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE,
            CreateDisposition.FILE_OPEN_IF if create else CreateDisposition.FILE_OPEN,
            CreateOptions.FILE_NON_DIRECTORY_FILE,
        )
        return f

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer at the end of the file), its SMB requests
        in flight together."""
        return self.pread_many([(offset, length)])[0]

    def _in_flight(self, requests: list[tuple[int, Callable[[], tuple[Any, Any]]]]) -> list[Any]:
        """Send requests (payload length, a maker of smbprotocol's unsent message and its
        receiver) as many at a time as this connection's credits allow (one credit per
        64 KiB), then take their answers in order; the answers, in order."""
        tree = self.file.tree_connect
        sid, tid = tree.session.session_id, tree.tree_connect_id
        answers: list[Any] = []
        with self._lock:
            at = 0
            while at < len(requests):
                window = self.conn.sequence_window
                credits = max(1, int(window["high"]) - int(window["low"]))
                sent: list[tuple[Any, Any]] = []
                used = 0
                while at < len(requests):
                    length, make = requests[at]
                    charge = max(1, -(-length // 65536))
                    if sent and used + charge > credits:
                        break
                    msg, receive = make()
                    sent.append((self.conn.send(msg, sid, tid), receive))
                    used, at = used + charge, at + 1
                answers += [receive(request) for request, receive in sent]
        return answers

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
        try:
            got = self._in_flight(
                [(n, partial(self.file.read, o, n, send=False)) for _i, o, n in pieces]
            )
            for (i, _o, n), data in zip(pieces, got, strict=True):
                if len(data) != n:
                    raise SMBException(f"short read ({len(data)} of {n} bytes)")
                out[i].append(data)
        except (SMBException, OSError) as exc:
            raise TransientError(f"{self.where}: batched read failed: {exc}") from exc
        return [parts[0] if len(parts) == 1 else b"".join(parts) for parts in out]

    def pwrite_many(self, pieces: list[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """(offset, data) writes with their requests in flight together on this connection
        (as many as its credits allow); done when every one is acknowledged."""
        from smbprotocol.exceptions import SMBException

        split: list[tuple[int, memoryview]] = []
        for offset, data in pieces:
            view = memoryview(data).cast("B")
            split += [
                (offset + o, view[o : o + self.max_write])
                for o in range(0, len(view), self.max_write)
            ]
        try:

            def maker(offset: int, view: memoryview) -> Callable[[], tuple[Any, Any]]:
                return lambda: self.file.write(bytes(view), offset, send=False)  # copy at send

            done = self._in_flight([(len(v), maker(o, v)) for o, v in split])
            if any(n != len(v) for n, (_o, v) in zip(done, split, strict=True)):
                raise SMBException("short write")
            with self._lock:
                self._size = max([self._size, *(o + len(v) for o, v in split)])
        except (SMBException, OSError) as exc:
            raise TransientError(f"{self.where}: write failed: {exc}") from exc

    def flush(self) -> None:
        """Ask the server to make this file's writes durable."""
        from smbprotocol.exceptions import SMBException

        try:
            with self._lock:
                self.file.flush()
        except (SMBException, OSError) as exc:
            raise TransientError(f"{self.where}: flush failed: {exc}") from exc

    def close(self) -> None:
        """Close the file; its authenticated tree goes back to `TREES` for the next file."""
        tree, self._tree = getattr(self, "_tree", None), None
        f = getattr(self, "file", None)
        if tree is not None and f is not None:
            try:
                f.close()
            except Exception:  # the connection is gone: nothing to keep
                _disconnect(tree)
            else:
                TREES.give(self._key, tree)
            return
        try:
            self.conn.disconnect(True)
        except Exception:  # closing a connection that never opened, or is gone
            pass


TreeKey = tuple[str, int, str, str, str]
"""(host, port, share, user, password): whose trees can be lent to a file."""


def _disconnect(tree: Any) -> None:
    try:
        tree.session.connection.disconnect(True)
    except Exception:  # already gone
        pass


class TreeCache:
    """Authenticated SMB trees (connection, encrypted session, tree connect) kept between
    files, so that a cycle's files open with one CREATE instead of a TCP connect, negotiate,
    NTLM login and tree connect each; `drain` closes a host's idle ones."""

    KEEP = 16
    """Idle trees kept per share and login."""

    def __init__(self) -> None:
        self._idle: dict[TreeKey, list[Any]] = {}
        self._lock = threading.Lock()

    def take(self, key: TreeKey) -> Any | None:
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def give(self, key: TreeKey, tree: Any) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.KEEP:
                idle.append(tree)
                return
        _disconnect(tree)

    def drain(self, host: str | None = None) -> None:
        """Close the idle trees of `host` (of every host when None)."""
        with self._lock:
            keys = [k for k in self._idle if host is None or k[0] == host]
            trees = [t for k in keys for t in self._idle.pop(k)]
        for tree in trees:
            _disconnect(tree)


TREES = TreeCache()
"""The process's idle SMB trees (the service keeps them between cycles)."""


def check_path(path: str) -> str:
    """A share-relative path as SMB wants it (backslashes, no leading one)."""
    clean = path.replace("/", "\\").lstrip("\\")
    if not clean or ".." in clean.split("\\"):
        raise PluginError(f"not a path inside a share: {path!r}")
    return clean


class SmbPool:
    """Up to `size` connections to one file, lent to the engine's threads in turn: the reads
    (or writes) of a disk are in flight together instead of queueing on one connection."""

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

    def pwrite_many(self, pieces: list[tuple[int, bytes | bytearray | memoryview]]) -> None:
        f = self._borrow()
        try:
            f.pwrite_many(pieces)
        finally:
            with self._cond:
                self.size = max(self.size, f.size)
                for other in self._all:  # every connection reads up to the new end
                    other._size = max(other._size, self.size)
                self._idle.append(f)
                self._cond.notify()

    def flush(self) -> None:
        """Flush every connection's handle (each one's writes reach the disk)."""
        with self._cond:
            files = list(self._all)
        for f in files:
            f.flush()

    def close(self) -> None:
        with self._cond:
            files, self._all, self._idle = self._all, [], []
        for f in files:
            if isinstance(f, SmbFile):
                f.close()


class SmbShare:
    """Folder and file management on one share (smbclient, its own connection cache)."""

    def __init__(self, host: str, share: str, user: str, password: str, port: int = 445) -> None:
        import smbclient
        from smbprotocol.exceptions import LogonFailure, SMBException

        self.host, self.share, self.port = host, share, port
        self.user, self.password = user, password
        self.cache: dict[str, Any] = {}
        try:
            smbclient.register_session(
                host, user, password, port=port, encrypt=True, connection_cache=self.cache
            )
        except LogonFailure:
            raise AuthError(f"SMB {host}: login failed for user '{user}'") from None
        except (SMBException, OSError, ValueError) as exc:
            raise TransientError(f"SMB {host}:{port}: {exc}") from exc

    def unc(self, path: str) -> str:
        return f"\\\\{self.host}\\{self.share}\\{check_path(path)}"

    def _kw(self) -> dict[str, Any]:
        return {"port": self.port, "connection_cache": self.cache}

    def _call(self, what: str, path: str, fn: Any, *args: Any) -> Any:
        from smbprotocol.exceptions import SMBException

        try:
            return fn(*args, **self._kw())
        except (SMBException, OSError) as exc:
            if isinstance(exc, FileNotFoundError) or getattr(exc, "errno", None) == errno.ENOENT:
                raise NotFound(f"{self.unc(path)} not found") from None
            raise TransientError(f"{self.unc(path)}: {what} failed: {exc}") from exc

    def makedirs(self, path: str) -> None:
        import smbclient

        self._call(
            "mkdir", path, lambda **kw: smbclient.makedirs(self.unc(path), exist_ok=True, **kw)
        )

    def exists(self, path: str) -> bool:
        import smbclient

        try:
            self._call("stat", path, smbclient.stat, self.unc(path))
        except NotFound:
            return False
        return True

    def size(self, path: str) -> int:
        import smbclient

        return int(self._call("stat", path, smbclient.stat, self.unc(path)).st_size)

    def listdir(self, path: str) -> list[str]:
        import smbclient

        try:
            return sorted(self._call("list", path, smbclient.listdir, self.unc(path)))
        except NotFound:
            return []

    def remove(self, path: str) -> None:
        """Delete a file; a missing one is fine."""
        import smbclient

        try:
            self._call("delete", path, smbclient.remove, self.unc(path))
        except NotFound:
            pass

    def rmtree(self, path: str) -> None:
        """Delete a folder and everything in it; a missing one is fine."""
        import smbclient

        if not self.exists(path):
            return
        for name in self.listdir(path):
            child = f"{check_path(path)}\\{name}"
            entry = self._call("stat", child, smbclient.lstat, self.unc(child))
            if entry.st_mode & 0o040000:
                self.rmtree(child)
            else:
                self.remove(child)
        self._call("rmdir", path, smbclient.rmdir, self.unc(path))

    def write_text(self, path: str, text: str) -> None:
        import smbclient

        def put(**kw: Any) -> None:
            with smbclient.open_file(self.unc(path), mode="w", encoding="utf-8", **kw) as f:
                f.write(text)

        self._call("write", path, put)

    def read_text(self, path: str) -> str:
        import smbclient

        def get(**kw: Any) -> str:
            with smbclient.open_file(self.unc(path), mode="r", encoding="utf-8", **kw) as f:
                return str(f.read())

        return str(self._call("read", path, get))

    def rename(self, src: str, dst: str) -> None:
        import smbclient

        self._call("rename", src, smbclient.rename, self.unc(src), self.unc(dst))

    def close(self) -> None:
        import smbclient

        try:
            smbclient.reset_connection_cache(connection_cache=self.cache)
        except Exception:  # a connection already gone
            pass
