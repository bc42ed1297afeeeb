"""Plugin discovery through the `standby.sources` and `standby.targets` entry points.

The core never imports a plugin by name; it only loads what the entry points declare.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TypeVar

from standby.core.errors import NotFound, PluginError
from standby.core.interfaces import Plugin, Source, Target

GROUPS = {"source": "standby.sources", "target": "standby.targets"}
_P = TypeVar("_P", bound=Plugin)


@dataclass(frozen=True)
class PluginStatus:
    """One registered plugin role and whether it can work here."""

    name: str
    role: str
    distribution: str
    version: str
    ok: bool
    reason: str = ""


@functools.cache
def _entry_points(role: str) -> dict[str, EntryPoint]:
    """The registered plugins of a role (read once per process: the scan costs ~10 ms)."""
    return {ep.name: ep for ep in entry_points(group=GROUPS[role])}


def _load(ep: EntryPoint, base: type[_P]) -> type[_P]:
    try:
        cls = ep.load()
    except Exception as exc:  # any import failure is reported, never fatal to the CLI
        raise PluginError(f"plugin '{ep.name}' cannot load: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"plugin '{ep.name}' does not provide a {base.__name__} class")
    return cls


def list_plugins() -> list[PluginStatus]:
    """Every registered source and target, with the reason when one cannot work."""
    rows: list[PluginStatus] = []
    for role, base in (("source", Source), ("target", Target)):
        for name, ep in sorted(_entry_points(role).items()):
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            try:
                cls = _load(ep, base)
                reason = cls.unavailable_reason()
            except PluginError as exc:
                reason = str(exc)
            rows.append(PluginStatus(name, role, dist, version, reason is None, reason or ""))
    return rows


def _find(name: str, role: str, base: type[_P]) -> type[_P]:
    eps = _entry_points(role)
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise NotFound(f"no {role} plugin '{name}' is installed (installed: {known})")
    cls = _load(eps[name], base)
    reason = cls.unavailable_reason()
    if reason:
        raise PluginError(f"plugin '{name}' cannot work on this machine: {reason}")
    return cls


def source_class(name: str) -> type[Source]:
    return _find(name, "source", Source)  # type: ignore[type-abstract]


def target_class(name: str) -> type[Target]:
    return _find(name, "target", Target)  # type: ignore[type-abstract]
