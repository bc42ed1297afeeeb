"""libnbd handles, one per thread and export, so the engine's threads never share one.

Only libnbd's synchronous calls are used. Its aio calls were tried for the engine's batched
reads and writes and dropped: with Debian's libnbd 1.14 the Python binding keeps every
buffer handed to `aio_pread`/`aio_pwrite` (`nbd.Buffer.from_buffer`) alive for good (300
writes of 1 MiB grew the process by 301 MiB), and a thread in `poll()` on a handle deadlocked
with the checkpoint's `flush()` of the same handle from another thread."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from standby.core.errors import PluginError, TransientError

STATE_ZERO = 2
DIRTY = 1
STATUS_CHUNK = 1 << 30


def nbd_module() -> Any:
    import nbd

    return nbd


class NbdPool:
    """Per-thread NBD connections to the exports of one unix-socket server."""

    def __init__(self, socket: Path, writable: bool = False) -> None:
        self.socket = socket
        self.writable = writable
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def handle(self, export: str, contexts: tuple[str, ...] = ()) -> Any:
        key = (export, contexts)
        handles: dict[tuple[str, tuple[str, ...]], Any] = getattr(self._local, "h", None) or {}
        self._local.h = handles
        if key not in handles:
            handles[key] = self._connect(export, contexts)
        return handles[key]

    def _connect(self, export: str, contexts: tuple[str, ...]) -> Any:
        nbd = nbd_module()
        h = nbd.NBD()
        for ctx in contexts:
            h.add_meta_context(ctx)
        h.set_export_name(export)
        deadline = time.monotonic() + 10
        while True:
            try:
                h.connect_unix(str(self.socket))
                break
            except nbd.Error as exc:
                if time.monotonic() > deadline:
                    raise TransientError(f"NBD export '{export}' unreachable: {exc}") from exc
                time.sleep(0.05)
                h = nbd.NBD()
                for ctx in contexts:
                    h.add_meta_context(ctx)
                h.set_export_name(export)
        with self._lock:
            self._all.append(h)
        return h

    def flush(self) -> None:
        with self._lock:
            handles = list(self._all)
        nbd = nbd_module()
        try:
            for h in handles:
                h.flush()
        except nbd.Error as exc:
            raise TransientError(f"NBD flush failed: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            handles, self._all = self._all, []
        for h in handles:
            with contextlib.suppress(Exception):  # closing is best effort
                h.shutdown()


def extents(h: Any, context: str, want: int, match: int) -> Iterator[tuple[int, int]]:
    """(start, end) ranges whose status flags under `context` satisfy flags & want == match."""
    nbd = nbd_module()
    size = h.get_size()
    offset = 0
    while offset < size:
        found: list[tuple[int, int]] = []

        def cb(
            ctx: str, off: int, entries: list[int], _err: Any, found: list[tuple[int, int]] = found
        ) -> int:
            if ctx != context:
                return 0
            pos = off
            for i in range(0, len(entries), 2):
                length, flags = entries[i], entries[i + 1]
                if flags & want == match:
                    found.append((pos, pos + length))
                pos += length
            found.append((pos, -1))  # sentinel: how far this reply reached
            return 0

        try:
            h.block_status(min(STATUS_CHUNK, size - offset), offset, cb)
        except nbd.Error as exc:
            raise PluginError(f"NBD block status failed: {exc}") from exc
        reached = offset
        for start, end in found:
            if end == -1:
                reached = max(reached, start)
            else:
                yield start, min(end, size)
        if reached <= offset:
            raise PluginError("NBD block status made no progress")
        offset = reached
