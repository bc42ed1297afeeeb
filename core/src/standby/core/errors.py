"""The one error tree of standby; each error maps to a documented exit code."""

from __future__ import annotations


class StandbyError(Exception):
    """Base of every error standby raises on purpose; the message is one line for operators."""

    exit_code = 1


class ConfigError(StandbyError):
    """Malformed, incomplete or contradictory configuration or input."""

    exit_code = 2


class RoleNotConfigured(ConfigError):
    """The site file lacks the keys one role needs (a source-only site used as a target)."""


class NotFound(StandbyError):
    """A site, VM, protection, recovery point or plugin that does not exist."""

    exit_code = 3


class AuthError(StandbyError):
    """Credentials were refused or a secret reference cannot be resolved."""

    exit_code = 4


class CapabilityNotSupported(StandbyError):
    """The plugin or platform cannot do what was asked (or the VM cannot be protected)."""

    exit_code = 5


class PluginError(StandbyError):
    """A plugin failed to load or its platform failed in a way that retrying will not fix."""

    exit_code = 6


class TransientError(StandbyError):
    """A failure worth retrying (timeouts, throttling, connection resets)."""

    exit_code = 7


class Busy(StandbyError):
    """Another standby process holds the lock for this protection or site."""

    exit_code = 8


class IntegrityError(StandbyError):
    """Stored data failed its authentication (a tampered or corrupt vault record or chunk):
    the message names the record; nothing built on it is used."""

    exit_code = 9


class Interrupted(StandbyError):
    """Work was stopped on request (Ctrl-C, the end of `--watch`); the next run resumes it."""

    exit_code = 130


EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (
        StandbyError,
        ConfigError,
        NotFound,
        AuthError,
        CapabilityNotSupported,
        PluginError,
        TransientError,
        Busy,
        IntegrityError,
        Interrupted,
    )
}
