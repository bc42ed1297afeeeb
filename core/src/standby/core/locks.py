"""Inter-process locks (one replication or failover per protection at a time)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from standby.core.errors import Busy


class FileLock:
    """An exclusive flock on a file holding the owner's pid; released when the process dies."""

    def __init__(self, path: Path, what: str, wait: bool = False) -> None:
        self.path = path
        self.what = what
        self.wait = wait
        self.fd: int | None = None

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise Busy(
                f"{self.what} is already running (pid {holder}); retry later or use --wait"
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    @staticmethod
    def held(path: Path) -> bool:
        """Whether some process holds the lock at `path` right now."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def vm_lock_path(home: Path, vm_name: str) -> Path:
    """The lock file that serialises replication and failover of one VM."""
    return home / "locks" / f"vm-{vm_name}.lock"


def vm_lock(home: Path, vm_name: str, what: str, wait: bool = False) -> FileLock:
    """The VM's exclusive lock, for `what` (replication, failover...) of that VM."""
    return FileLock(vm_lock_path(home, vm_name), f"{what} of VM '{vm_name}'", wait)
