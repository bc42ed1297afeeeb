"""Standby home, site files, policies and secret references."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, PrivateAttr, ValidationError

from standby.core.errors import AuthError, ConfigError, NotFound

SECRET_RE = re.compile(r"^(env|file|keyring):(.+)$")
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def home() -> Path:
    """The standby home: $STANDBY_HOME, else ~/.config/standby."""
    env = os.environ.get("STANDBY_HOME")
    return Path(env) if env else Path.home() / ".config" / "standby"


def _check_secret_ref(value: object) -> str:
    if not isinstance(value, str) or not SECRET_RE.match(value):
        raise ValueError("must be a secret reference (env:NAME, file:PATH or keyring:SERVICE/USER)")
    return value


SecretRef = Annotated[str, BeforeValidator(_check_secret_ref)]
"""A config value that names where a secret lives; literal secrets are refused."""


def resolve_secret(ref: str, where: str | None = None) -> str:
    """Resolve a secret reference; the error names the reference and `where` it is written
    (a site file and key), never the value."""
    m = SECRET_RE.match(ref)
    at = f" ({where})" if where else ""
    if not m:
        raise ConfigError(f"secret{at} must be a reference (env:, file:, keyring:)")
    scheme, rest = m.group(1), m.group(2)
    if scheme == "env":
        value = os.environ.get(rest)
        if value is None:
            raise AuthError(f"secret {ref}{at} is not set in the environment")
        return value
    if scheme == "file":
        try:
            return Path(rest).expanduser().read_text().strip()
        except OSError as exc:
            raise AuthError(f"secret {ref}{at} cannot be read: {exc.strerror}") from exc
    service, _, user = rest.partition("/")
    try:
        import keyring

        value = keyring.get_password(service, user)
    except Exception as exc:  # keyring backends raise their own types
        raise AuthError(f"secret {ref}{at}: keyring unavailable ({type(exc).__name__})") from exc
    if value is None:
        raise AuthError(f"secret {ref}{at} is not in the keyring")
    return str(value)


class SiteOptions(BaseModel):
    """Base of every plugin's site model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    _origin: str = PrivateAttr(default="site file")

    def secret(self, key: str) -> str:
        """Resolve the secret reference at `key` (dotted for a table: `credential.token`);
        an error names the site file and the key."""
        value: Any = self
        for part in key.split("."):
            value = getattr(value, part)
        return resolve_secret(str(value), f"{self._origin}: key '{key}'")


_O = TypeVar("_O", bound=SiteOptions)


@dataclass(frozen=True)
class Site:
    """One configured platform endpoint, parsed from `sites/<name>.toml`."""

    name: str
    plugin: str
    path: Path
    raw: dict[str, Any] = field(default_factory=dict)

    def options(self, model: type[_O]) -> _O:
        """Validate the vendor-specific keys into the plugin's model (one-line errors)."""
        try:
            opts = model.model_validate(self.raw)
        except ValidationError as exc:
            raise ConfigError(f"{self.path}: {_first_error(exc)}") from None
        opts._origin = str(self.path)
        return opts


def suggest(key: str, known: Iterable[str]) -> str:
    """` (did you mean 'uri'?)` for a key close to one of `known`, else ''."""
    near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _dotted(loc: Iterable[object]) -> str:
    return ".".join(str(p) for p in loc)


def first_error(exc: ValidationError, loc: Callable[[Any], str] = _dotted) -> str | None:
    """A misspelt key as one line, `unknown key 'url' (did you mean 'uri'?)`: an unknown key
    close to a key the same table misses; None when there is none."""
    errors = exc.errors()
    missing = {tuple(e["loc"]) for e in errors if e["type"] == "missing"}
    for err in errors:
        if err["type"] != "extra_forbidden":
            continue
        where, name = tuple(err["loc"][:-1]), str(err["loc"][-1])
        wanted = [str(m[-1]) for m in missing if m[:-1] == where]
        hint = suggest(name, wanted)
        if hint:
            return f"unknown key '{loc(err['loc'])}'{hint}"
    return None


def _first_error(exc: ValidationError) -> str:
    found = first_error(exc)
    if found:
        return found
    err = exc.errors()[0]
    key = _dotted(err["loc"]) or "(file)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{key}'"
    if kind == "missing":
        return f"missing key '{key}'"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"key '{key}': {msg}"


def sites_dir(base: Path | None = None) -> Path:
    return (base or home()) / "sites"


def load_site_file(path: Path) -> Site:
    """Parse one site file; every problem is a one-line ConfigError naming the file."""
    name = path.stem
    if not SITE_NAME_RE.match(name):
        raise ConfigError(f"{path}: site name '{name}' must be letters, digits, '.', '_' or '-'")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    plugin = data.pop("plugin", None)
    if plugin is None:
        raise ConfigError(f"{path}: missing key 'plugin'")
    if not isinstance(plugin, str):
        raise ConfigError(f"{path}: key 'plugin' must be a string")
    return Site(name=name, plugin=plugin, path=path, raw=data)


def load_sites(base: Path | None = None) -> dict[str, Site]:
    directory = sites_dir(base)
    if not directory.is_dir():
        return {}
    return {p.stem: load_site_file(p) for p in sorted(directory.glob("*.toml"))}


def get_site(name: str, base: Path | None = None) -> Site:
    path = sites_dir(base) / f"{name}.toml"
    if not path.exists():
        known = ", ".join(sorted(load_sites(base))) or "none"
        raise NotFound(f"unknown site '{name}' (configured: {known})")
    return load_site_file(path)


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: str | int | float, what: str = "duration") -> int:
    """'90s', '15m', '1h', '7d' -> seconds."""
    if isinstance(value, int | float):
        return int(value)
    m = _DURATION_RE.match(value)
    if not m:
        raise ConfigError(f"{what}: '{value}' is not a duration like 30s, 15m, 1h or 7d")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


class Policy(BaseModel):
    """RPO target, retention, app-consistency and bandwidth for a protection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpo_seconds: int = 900
    retain_count: int = 24
    retain_age_seconds: int = 7 * 86400
    app_consistent_every_seconds: int = 0
    bandwidth_mbps: float = 0.0
    verify: str = "auto"
    shutdown_timeout_seconds: int = 120
    replication: str = "standby"
    """Who moves the bytes: standby's own engine, or a platform's replication standby
    orchestrates (`"hyperv-replica"`), when the target offers it (`Target.native`)."""

    @classmethod
    def from_toml(cls, data: dict[str, Any], where: str) -> Policy:
        """Build from a TOML table with human units (rpo = "15m", retain_age = "7d", ...)."""
        mapping = {
            "rpo": "rpo_seconds",
            "retain": "retain_count",
            "retain_age": "retain_age_seconds",
            "app_consistent_every": "app_consistent_every_seconds",
            "bandwidth_mbps": "bandwidth_mbps",
            "verify": "verify",
            "shutdown_timeout": "shutdown_timeout_seconds",
            "replication": "replication",
        }
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key not in mapping:
                raise ConfigError(f"{where}: unknown key '{key}'{suggest(key, mapping)}")
            if key in ("rpo", "retain_age", "app_consistent_every", "shutdown_timeout"):
                value = parse_duration(value, f"{where}: key '{key}'")
            out[mapping[key]] = value
        try:
            return cls(**out).checked(where)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {_first_error(exc)}") from None

    def checked(self, where: str = "policy") -> Policy:
        if self.rpo_seconds < 10:
            raise ConfigError(f"{where}: rpo must be at least 10s")
        if self.retain_count < 1:
            raise ConfigError(f"{where}: retain must keep at least 1 recovery point")
        if self.verify not in ("auto", "full", "sample", "none"):
            raise ConfigError(f"{where}: verify must be auto, full, sample or none")
        if self.bandwidth_mbps < 0:
            raise ConfigError(f"{where}: bandwidth_mbps cannot be negative")
        return self


def load_policy(name: str, base: Path | None = None) -> Policy:
    """Policy from `policies/<name>.toml`; 'default' is built in unless a file overrides it."""
    path = (base or home()) / "policies" / f"{name}.toml"
    if not path.exists():
        if name == "default":
            return Policy()
        raise NotFound(f"unknown policy '{name}' (no {path})")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return Policy.from_toml(data, str(path))
