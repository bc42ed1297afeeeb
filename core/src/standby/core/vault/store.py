"""Where a vault's objects live: a local directory (built in), or a store another package
registers in the `standby.vault_stores` entry-point group by URL scheme (`s3` by
standby-aws, `azure` by standby-azure), so the core never imports a cloud SDK.

Objects are whole (a put is seen complete or not at all) and immutable once written, except
that the vault deletes them. Every call that may fail for a while raises TransientError; the
vault retries those.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import urlparse

from standby.core.config import Site
from standby.core.errors import ConfigError, NotFound, PluginError, TransientError

GROUP = "standby.vault_stores"


class Store(ABC):
    """A flat namespace of objects named like `packs/ab12...` (slash-separated)."""

    url: str = ""

    @abstractmethod
    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Write an object whole (atomically: never seen half-written)."""

    @abstractmethod
    def get(self, name: str) -> bytes:
        """An object's bytes; NotFound when it does not exist."""

    @abstractmethod
    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """`length` bytes of an object at `offset`."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Names under `prefix` (`packs/`), sorted."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete an object; a missing one is fine."""

    def size(self, name: str) -> int:
        return len(self.get(name))

    def close(self) -> None:  # noqa: B027  (most stores hold nothing to release)
        """Release connections."""


class LocalStore(Store):
    """A directory: each object a file, written to a temporary name, fsynced and renamed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"file://{root}"

    def _path(self, name: str) -> Path:
        if name.startswith("/") or ".." in name.split("/"):
            raise PluginError(f"bad vault object name {name!r}")
        return self.root / name

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        path = self._path(name)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise TransientError(f"vault store {self.url}: cannot write {name}: {exc}") from exc

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"vault store {self.url}: {name} not found") from None
        except OSError as exc:
            raise TransientError(f"vault store {self.url}: cannot read {name}: {exc}") from exc

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(name), os.O_RDONLY)
        except FileNotFoundError:
            raise NotFound(f"vault store {self.url}: {name} not found") from None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                if not f.startswith("."):
                    out.append(str(Path(dirpath, f).relative_to(self.root)))
        return sorted(out)

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink(missing_ok=True)
        except OSError as exc:
            raise TransientError(f"vault store {self.url}: cannot delete {name}: {exc}") from exc

    def size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"vault store {self.url}: {name} not found") from None


def open_store(url: str, site: Site | None = None) -> Store:
    """The store at `url`: a path or `file://PATH`, else the scheme's registered store
    (which may take its credentials and endpoint from `site`)."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else url).expanduser()
        if not path.is_absolute():
            raise ConfigError(f"vault store '{url}': a local store needs an absolute path")
        return LocalStore(path)
    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    if parsed.scheme not in eps:
        known = ", ".join(["file", *sorted(eps)])
        raise NotFound(f"no vault store for '{parsed.scheme}://' is installed (installed: {known})")
    try:
        factory = eps[parsed.scheme].load()
    except Exception as exc:  # an import failure is reported, never fatal
        raise PluginError(f"vault store '{parsed.scheme}' cannot load: {exc}") from exc
    store: Store = factory(url, site)
    return store
