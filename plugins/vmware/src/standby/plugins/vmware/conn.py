"""A vSphere site: its keys, the pinned TLS, the pyvmomi session and error translation."""

from __future__ import annotations

import hashlib
import http.client
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import Field, field_validator

from standby.core import tlspin
from standby.core.config import SecretRef, SiteOptions
from standby.core.errors import (
    AuthError,
    NotFound,
    PluginError,
    StandbyError,
    TransientError,
)

SNAPSHOT_PREFIX = "standby-cycle"
"""Snapshots standby takes are named `standby-cycle-...`: a killed run's are found by name."""
REPLICA_KEY = "standby.role"
"""extraConfig key standby sets on VMs it creates (replicas, test VMs): not protectable."""
FAILOVER_KEY = "standby.failover"
"""extraConfig key naming the failover that created a VM (found by it after a crash)."""


class VMwareOptions(SiteOptions):
    """Keys of a `plugin = "vmware"` site file."""

    host: str
    port: int = Field(default=443, ge=1, le=65535)
    user: str
    password: SecretRef
    datacenter: str
    cluster: str | None = None
    folder: str | None = None
    thumbprint: str | None = None
    """SHA-256 of the vCenter's certificate (DER), hex with or without colons."""
    ca_file: str | None = None
    vddk_libdir: str | None = None
    """Where VMware's VDDK is installed: then disks are read through nbdkit's vddk plugin."""
    max_parallel_reads: int = Field(default=8, ge=1, le=64)
    task_timeout: int = Field(default=1800, ge=1)
    # --- as a DR site (target)
    datastore: str | None = None
    """The datastore replicas and failed-over VMs live on."""
    datastore_path: str | None = None
    """Where that datastore is mounted on the machine standby runs on (an NFS datastore):
    the data mover writes replica files there."""
    resource_pool: str | None = None
    """Resource pool (name, under `cluster`) failed-over VMs run in; the cluster's root pool
    when unset."""
    networks: dict[str, str] = Field(default_factory=dict)
    """Source network or port group name -> port group at this site."""
    test_network: str = "standby-test"
    """Port group test failovers attach to: on a vSwitch with no uplink, made on first use."""

    @field_validator("thumbprint")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        return None if value is None else tlspin.sha256_hex(value)

    def tls(self) -> ssl.SSLContext:
        """The TLS context: the CA file's chain, or (thumbprint) no chain but a pinned key
        that every connection checks (`check_peer`)."""
        return tlspin.client_context(self.thumbprint, self.ca_file)

    def check_peer(self, sock: ssl.SSLSocket) -> None:
        """Refuse a connection whose certificate is not the pinned one (names both)."""
        der = sock.getpeercert(binary_form=True) or b""
        tlspin.check_pin(der, self.thumbprint, f"vCenter {self.host}:{self.port}")


def probe(opts: VMwareOptions) -> bytes:
    """Check the pinned identity before any credential is sent; the peer's certificate (DER)."""
    what = f"vCenter {opts.host}:{opts.port}"
    return tlspin.probe(opts.host, opts.port, opts.thumbprint, opts.ca_file, what)


def peer_sha1(opts: VMwareOptions) -> str:
    """The vCenter certificate's SHA-1 thumbprint (what VDDK pins), after the real check."""
    return tlspin.colons(hashlib.sha1(probe(opts)).hexdigest())


def connect(opts: VMwareOptions) -> Any:
    """A logged-in ServiceInstance."""
    from pyVim.connect import SmartConnect
    from pyVmomi import vim

    probe(opts)
    kwargs: dict[str, Any] = {"sslContext": opts.tls()}
    if opts.thumbprint:
        kwargs["thumbprint"] = opts.thumbprint
    try:
        return SmartConnect(
            host=opts.host,
            port=opts.port,
            user=opts.user,
            pwd=opts.secret("password"),
            **kwargs,
        )
    except vim.fault.InvalidLogin:
        raise AuthError(f"vCenter {opts.host}: login failed for user '{opts.user}'") from None
    except (OSError, http.client.HTTPException) as exc:
        raise TransientError(f"vCenter {opts.host}: {exc}") from exc


def open_datacenter(opts: VMwareOptions, site: str) -> tuple[Any, Any]:
    """A logged-in ServiceInstance and the site's datacenter (NotFound naming the ones there)."""
    from pyVmomi import vim

    si = connect(opts)
    with vim_errors(f"vCenter {opts.host}"):
        content = si.RetrieveContent()
        dcs = {e.name: e for e in content.rootFolder.childEntity if isinstance(e, vim.Datacenter)}
    dc = dcs.get(opts.datacenter)
    if dc is None:
        disconnect(si)
        names = ", ".join(sorted(dcs)) or "none"
        raise NotFound(
            f"site '{site}': datacenter '{opts.datacenter}' not found (vCenter has: {names})"
        )
    return si, dc


def disconnect(si: Any) -> None:
    """Log out; a gone vCenter is not an error."""
    from pyVim.connect import Disconnect

    try:
        Disconnect(si)
    except Exception:  # logging out of a gone vCenter is not an error
        pass


def extra_config(cfg: Any) -> dict[str, str]:
    """A VM config's extraConfig as a dict."""
    return {str(o.key): str(o.value) for o in (getattr(cfg, "extraConfig", None) or ())}


def translate(exc: Exception, what: str) -> StandbyError:
    """A pyvmomi or transport error as a one-line standby error."""
    from pyVmomi import vim, vmodl

    if isinstance(exc, StandbyError):
        return exc
    if isinstance(exc, vim.fault.InvalidLogin | vim.fault.NotAuthenticated):
        return AuthError(f"{what}: not authenticated")
    if isinstance(exc, vmodl.fault.ManagedObjectNotFound):
        return NotFound(f"{what}: the object is gone")
    if isinstance(exc, OSError | http.client.HTTPException):
        return TransientError(f"{what}: {type(exc).__name__}: {exc}")
    msg = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    return PluginError(f"{what}: {' '.join(str(msg).split())}")


@contextmanager
def vim_errors(what: str) -> Iterator[None]:
    """Translate SDK exceptions raised inside the block."""
    try:
        yield
    except StandbyError:
        raise
    except Exception as exc:
        raise translate(exc, what) from exc


def wait_task(task: Any, what: str, timeout: float) -> Any:
    """The task's result once it succeeds (polled: some servers' task objects do not parse
    through WaitForTask); its fault, translated, when it fails."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        with vim_errors(what):
            info = task.info
            state = str(info.state)
        if state == "success":
            return info.result
        if state == "error":
            raise translate(info.error, what) if info.error else PluginError(f"{what}: failed")
        if time.monotonic() > deadline:
            raise TransientError(f"{what}: no result in {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
