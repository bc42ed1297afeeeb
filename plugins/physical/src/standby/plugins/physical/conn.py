"""libvirt connections: the event loop, embedded roots, auth and error translation."""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlparse

from pydantic import Field, field_validator

from standby.core.config import SecretRef, Site, SiteOptions
from standby.core.errors import (
    AuthError,
    Busy,
    ConfigError,
    NotFound,
    PluginError,
    StandbyError,
    TransientError,
)

EMBED_QEMU_CONF = """\
# written by standby for an embedded (daemon-less) libvirt root
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
"""


class PhysicalOptions(SiteOptions):
    """Keys of a `plugin = "physical"` site file."""

    uri: str
    username: str | None = None
    password: SecretRef | None = None
    domain_type: Literal["kvm", "qemu"] = "kvm"
    work_dir: str | None = None
    pool_dir: str | None = None
    networks: dict[str, str] = Field(default_factory=dict)
    vault: str | None = None
    """A vault whose key seals the point records this target keeps beside its replicas."""

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError(f"'{value}' is not a libvirt URI (e.g. qemu:///system)")
        return value

    def embed_root(self) -> Path | None:
        parsed = urlparse(self.uri)
        if parsed.path == "/embed":
            roots = parse_qs(parsed.query).get("root")
            if not roots:
                raise ConfigError("key 'uri': qemu:///embed needs ?root=DIR")
            return Path(roots[0])
        return None

    def is_local(self) -> bool:
        return not urlparse(self.uri).netloc

    def work_path(self) -> Path:
        if self.work_dir:
            return Path(self.work_dir)
        root = self.embed_root()
        return (root / "standby-work") if root else Path("/var/lib/standby/work")


_loop_lock = threading.Lock()
_loop_started = False


def libvirt_module() -> Any:
    import libvirt

    return libvirt


def unavailable_reason() -> str | None:
    """Why the plugin cannot work here (the libvirt or libnbd Python bindings missing)."""
    for mod, hint in (
        ("libvirt", "pip package libvirt-python (needs libvirt-dev to build)"),
        ("nbd", "Debian package python3-libnbd linked into the virtualenv (make setup)"),
    ):
        if importlib.util.find_spec(mod) is None:
            return f"Python module '{mod}' is missing: install {hint}"
    return None


def _start_event_loop() -> None:
    global _loop_started
    libvirt = libvirt_module()
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


def translate(exc: Exception, what: str) -> StandbyError:
    """A libvirt error as a one-line standby error."""
    libvirt = libvirt_module()
    if not isinstance(exc, libvirt.libvirtError):
        return PluginError(f"{what}: {type(exc).__name__}: {exc}")
    code = exc.get_error_code()
    msg = (exc.get_error_message() or str(exc)).splitlines()[0]
    if "Failed to acquire pid file" in msg:
        return Busy(f"{what}: the embedded libvirt root is in use by another standby process")
    if code in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT):
        return NotFound(f"{what}: {msg}")
    if code in (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_CANCELLED):
        return AuthError(f"{what}: authentication failed")
    if code in (
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_OPERATION_TIMEOUT,
        libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
    ):
        return TransientError(f"{what}: {msg}")
    return PluginError(f"{what}: {msg}")


@contextmanager
def libvirt_errors(what: str) -> Iterator[None]:
    """Translate libvirt exceptions raised inside the block."""
    libvirt = libvirt_module()
    try:
        yield
    except libvirt.libvirtError as exc:
        raise translate(exc, what) from exc


def prepare_embed_root(root: Path) -> None:
    """An embedded root needs a qemu.conf that lets QEMU run as this user without a daemon."""
    conf = root / "etc" / "qemu.conf"
    if not conf.exists():
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(EMBED_QEMU_CONF)


def open_connection(site: Site, opts: PhysicalOptions) -> Any:
    """Open the site's libvirt connection (authenticating with the secret reference if any)."""
    libvirt = libvirt_module()
    root = opts.embed_root()
    what = f"site '{site.name}' ({opts.uri})"
    try:
        if root is not None:
            return _shared_embedded(opts.uri, root)
        _start_event_loop()
        if opts.password is None and opts.username is None:
            return libvirt.open(opts.uri)
        password = opts.secret("password") if opts.password else ""

        def creds(items: list[list[Any]], _data: object) -> int:
            for item in items:
                if item[0] == libvirt.VIR_CRED_AUTHNAME:
                    item[4] = opts.username or ""
                elif item[0] == libvirt.VIR_CRED_PASSPHRASE:
                    item[4] = password
            return 0

        auth: list[Any] = [
            [libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE],
            creds,
            None,
        ]
        return libvirt.openAuth(opts.uri, auth, 0)
    except libvirt.libvirtError as exc:
        err = translate(exc, f"cannot connect to {what}")
        if type(err) is PluginError:
            err = TransientError(str(err))
        raise err from exc


_embedded: dict[str, list[Any]] = {}
"""URI -> [agent proxy, users]: one agent per embedded root per process, shared by the source
and the target of that site (re-protect uses a DR site as a source)."""


class _SharedConn:
    """A user's handle on a shared embedded connection; `close` drops only this user."""

    def __init__(self, uri: str, proxy: Any) -> None:
        self._uri = uri
        self._proxy = proxy
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._proxy, name)

    def qemu_monitor(self, command: str, flags: int) -> str:
        return str(self._proxy.qemu_monitor(command, flags))

    def close(self) -> int:
        if self._closed:
            return 0
        self._closed = True
        with _loop_lock:
            entry = _embedded.get(self._uri)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del _embedded[self._uri]
                    entry[0].close()
        return 0


def _shared_embedded(uri: str, root: Path) -> _SharedConn:
    with _loop_lock:
        entry = _embedded.get(uri)
        if entry is None:
            prepare_embed_root(root)
            from standby.plugins.physical.agent import open_embedded

            entry = _embedded[uri] = [open_embedded(uri), 0]
        entry[1] += 1
        return _SharedConn(uri, entry[0])


def qmp(dom: Any, command: str, **arguments: Any) -> dict[str, Any]:
    """One QMP command through libvirt; QEMU's whole reply ({"return": ...} or {"error": ...})."""
    msg = json.dumps({"execute": command, "arguments": arguments})
    return dict(json.loads(qemu_monitor(dom, msg, 0)))


def qemu_monitor(dom: Any, command: str, flags: int = 0) -> str:
    """libvirt_qemu.qemuMonitorCommand, also for domains living in an embedded-root agent."""
    from standby.plugins.physical.agent import Proxy

    if isinstance(dom, Proxy):
        return dom.qemu_monitor(command, flags)
    import libvirt_qemu

    return str(libvirt_qemu.qemuMonitorCommand(dom, command, flags))


class LibvirtPlugin:
    """Connection handling shared by the physical source and target."""

    site: Site
    opts: PhysicalOptions
    conn: Any = None

    def __init__(self, site: Site) -> None:
        super().__init__(site)  # type: ignore[call-arg]  # the Source/Target next in the MRO
        self.opts = site.options(PhysicalOptions)
        self.conn = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return unavailable_reason()

    def connect(self) -> None:
        if self.conn is None:
            quiet_libvirt()
            self.conn = open_connection(self.site, self.opts)

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # closing a dead connection is fine
                pass
            self.conn = None


def quiet_libvirt() -> None:
    """Stop libvirt from printing errors to stderr: standby reports them itself."""
    libvirt = libvirt_module()
    handler: Callable[[object, object], None] = lambda _ctx, _err: None  # noqa: E731
    libvirt.registerErrorHandler(handler, None)
