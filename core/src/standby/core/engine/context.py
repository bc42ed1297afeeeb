"""What every engine operation works with: the state, the connected sites, locks, progress."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

from standby.core import plugins
from standby.core.config import Site, get_site
from standby.core.errors import StandbyError
from standby.core.interfaces import Source, Target
from standby.core.locks import FileLock, vm_lock
from standby.core.state import Protection, State

from .progress import NullProgress, Progress


class Sites:
    """Connected plugins per (site, role), opened once and shared by the engine's threads."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._plugins: dict[tuple[str, str], Source | Target] = {}
        self._lock = threading.RLock()  # plan runs and --watch use sites from several threads
        self._connecting: dict[tuple[str, str], threading.Lock] = {}

    def site(self, name: str) -> Site:
        return get_site(name, self.home)

    def use(self, name: str, plugin: Source | Target) -> None:
        """Hand over an already-connected plugin for a site (tests, embedding)."""
        role = "source" if isinstance(plugin, Source) else "target"
        self._plugins[(name, role)] = plugin

    def pair(self, source: str, target: str) -> tuple[Source, Target]:
        """A cycle's source and target. When neither is connected yet they connect at the
        same time: one's SDK import or login overlaps the other's (an embedded root's agent
        starting, a vCenter session)."""
        with self._lock:
            cold = (source, "source") not in self._plugins and (
                target,
                "target",
            ) not in self._plugins
        if cold:
            with ThreadPoolExecutor(2, thread_name_prefix="standby-connect") as pool:
                src = pool.submit(self._get, source, "source")
                tgt = pool.submit(self._get, target, "target")
                src.result(), tgt.result()  # a source's error first, as when one at a time
        return self.source(source), self.target(target)

    def _get(self, name: str, role: str) -> Source | Target:
        """The connected plugin, connecting it once (other sites connect meanwhile)."""
        key = (name, role)
        with self._lock:
            if key in self._plugins:
                return self._plugins[key]
            connecting = self._connecting.setdefault(key, threading.Lock())
        with connecting:
            with self._lock:
                if key in self._plugins:
                    return self._plugins[key]
            site = self.site(name)
            cls = plugins.source_class if role == "source" else plugins.target_class
            plugin = cls(site.plugin)(site)
            plugin.connect()
            with self._lock:
                self._plugins[key] = plugin
            return plugin

    def source(self, name: str) -> Source:
        found = self._get(name, "source")
        assert isinstance(found, Source)
        return found

    def target(self, name: str) -> Target:
        found = self._get(name, "target")
        assert isinstance(found, Target)
        return found

    def close(self) -> None:
        """Close every plugin, all at once (closing one can take a while: a remote session,
        an embedded libvirt root saving its state)."""
        with self._lock:
            found, self._plugins = list(self._plugins.values()), {}
        if len(found) == 1:
            _close(found[0])
        elif found:
            with ThreadPoolExecutor(len(found), thread_name_prefix="standby-close") as pool:
                list(pool.map(_close, found))


def _close(plugin: Source | Target) -> None:
    with suppress(StandbyError):
        plugin.close()


class Context:
    """The engine's shared parts; every operation module takes one."""

    def __init__(
        self,
        state: State,
        home: Path,
        progress: Progress | None = None,
        workers: int | None = None,
        wait_for_lock: bool = False,
    ) -> None:
        self.state = state
        self.home = home
        self.sites = Sites(home)
        self.progress: Progress = progress or NullProgress()
        self.workers = workers
        self.wait_for_lock = wait_for_lock

    def site(self, name: str) -> Site:
        return self.sites.site(name)

    def source(self, site_name: str) -> Source:
        """The connected source plugin of a site."""
        return self.sites.source(site_name)

    def target(self, site_name: str) -> Target:
        """The connected target plugin of a site."""
        return self.sites.target(site_name)

    def lock(self, protection: Protection | str, what: str, wait: bool | None = None) -> FileLock:
        """The VM's exclusive lock (a second holder gets Busy, or waits with wait_for_lock)."""
        name = protection if isinstance(protection, str) else protection.vm_name
        return vm_lock(self.home, name, what, self.wait_for_lock if wait is None else wait)
