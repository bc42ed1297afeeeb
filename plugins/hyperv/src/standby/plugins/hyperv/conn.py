"""A Hyper-V site: its keys, verified TLS to the WinRM listener, and PowerShell with JSON.

Every script runs with `$ErrorActionPreference = 'Stop'` and ends in `ConvertTo-Json`, so the
answer is parsed, not scraped; a PowerShell error becomes one line carrying the cmdlet's own
message (`Get-VM : Hyper-V was unable to find a virtual machine with name "x".`). Each call
is one WinRM round trip (shell, command, receive, delete), counted in `round_trips`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from standby.core import tlspin
from standby.core.config import SecretRef, SiteOptions
from standby.core.errors import AuthError, ConfigError, NotFound, PluginError, TransientError

NOT_FOUND = ("unable to find", "was not found", "cannot find", "ObjectNotFound")


class HyperVOptions(SiteOptions):
    """Keys of a `plugin = "hyperv"` site file."""

    host: str
    port: int = Field(default=5986, ge=1, le=65535)
    user: str
    password: SecretRef
    transport: Literal["ntlm", "kerberos", "basic"] = "ntlm"
    """`ntlm` (messages also sealed by WinRM's own encryption) or `kerberos`; `basic` sends
    the password in each request, so it is only ever used over the verified HTTPS here."""
    ca_file: str | None = None
    thumbprint: str | None = None
    """SHA-256 of the listener's certificate, for a self-signed one."""
    operation_timeout: int = Field(default=120, ge=5)
    share: str | None = None
    """The SMB share through which standby reads (and, at a DR site, writes) VM disk files."""
    share_root: str | None = None
    """The host directory that `share` exposes (`D:\\Hyper-V`): disk paths under it map to
    files in the share."""
    smb_host: str | None = None
    """The file server, when it is not `host` (a scale-out file server, a cluster name)."""
    smb_port: int = Field(default=445, ge=1, le=65535)
    smb_user: str | None = None
    """Defaults to `user`."""
    smb_password: SecretRef | None = None
    """Defaults to `password`."""
    replica_dir: str = "standby"
    """At a DR site: the folder of `share` that holds replicas and failed-over VMs."""
    networks: dict[str, str] = Field(default_factory=dict)
    """At a DR site: source network (switch, port group, libvirt network) -> switch here.
    Unmapped networks go to a switch of the same name."""
    test_switch: str = "standby-test"
    """The private switch (no uplink) test failovers connect to; made when missing."""
    replica_server: str | None = None
    """For `replication = "hyperv-replica"`: the name primaries use to reach this host as a
    Hyper-V Replica server (defaults to `host`)."""
    replica_port: int = Field(default=443, ge=1, le=65535)
    replica_auth: Literal["Certificate", "Kerberos"] = "Certificate"
    replica_thumbprint: str | None = None
    """The certificate Hyper-V Replica authenticates with (Certificate auth)."""

    def host_path(self, share_path: str) -> str:
        """The host's path of a file in the share (`D:\\Hyper-V\\standby\\x.vhdx`)."""
        if not self.share or not self.share_root:
            raise ConfigError(
                f"{self._origin}: keys 'share' and 'share_root' are needed for a DR site"
            )
        return self.share_root.replace("/", "\\").rstrip("\\") + "\\" + share_path

    def smb_login(self) -> tuple[str, str]:
        """(user, password) for the share."""
        if self.smb_user is None:
            return self.user, self.secret("password")
        key = "smb_password" if self.smb_password is not None else "password"
        return self.smb_user, self.secret(key)

    def share_path(self, host_path: str, what: str) -> str:
        """The share-relative path of a file the host names (`D:\\Hyper-V\\web\\d.vhdx`);
        ConfigError when the site has no share or the file is outside it."""
        if not self.share or not self.share_root:
            raise ConfigError(
                f"{self._origin}: keys 'share' and 'share_root' are needed to read disks"
            )
        root = self.share_root.replace("/", "\\").rstrip("\\").lower()
        clean = host_path.replace("/", "\\")
        if not clean.lower().startswith(root + "\\"):
            raise ConfigError(
                f"{what}: {host_path} is not under share_root {self.share_root} "
                f"(share '{self.share}')"
            )
        return clean[len(root) + 1 :]

    @field_validator("thumbprint")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        return None if value is None else tlspin.sha256_hex(value)


class PowerShell:
    """PowerShell on one Hyper-V host through pywinrm, answers as JSON."""

    def __init__(self, opts: HyperVOptions) -> None:
        self.opts = opts
        self.round_trips = 0
        self._session: Any = None

    @property
    def what(self) -> str:
        return f"Hyper-V host {self.opts.host}:{self.opts.port}"

    def _connect(self) -> Any:
        import winrm

        o = self.opts
        der = tlspin.probe(o.host, o.port, o.thumbprint, o.ca_file, self.what)
        trust = o.ca_file
        if o.thumbprint:  # requests verifies against a CA file: make the pinned cert that file
            trust = str(tlspin.pinned_ca_file(der, Path(tempfile.gettempdir()) / "standby-tls"))
        return winrm.Session(
            f"https://{o.host}:{o.port}/wsman",
            auth=(o.user, o.secret("password")),
            transport=o.transport,
            message_encryption="always" if o.transport == "ntlm" else "auto",
            server_cert_validation="validate",
            ca_trust_path=trust or "legacy_requests",
            operation_timeout_sec=o.operation_timeout,
            read_timeout_sec=o.operation_timeout + 10,
        )

    def connect(self) -> None:
        """Check the listener's certificate and make the session (no credential is sent
        before the certificate is found good)."""
        if self._session is None:
            self._session = self._connect()

    def close(self) -> None:
        self._session = None

    def run(self, script: str, depth: int = 6) -> Any:
        """Run `script` (its output piped to ConvertTo-Json); the parsed answer (None when
        the script printed nothing)."""
        import requests
        from winrm.exceptions import InvalidCredentialsError, WinRMError

        if self._session is None:
            self._session = self._connect()
        full = (
            "$ErrorActionPreference = 'Stop'\n$ProgressPreference = 'SilentlyContinue'\n"
            f"& {{\n{script}\n}} | ConvertTo-Json -Depth {depth} -Compress"
        )
        self.round_trips += 1
        try:
            result = self._session.run_ps(full)
        except InvalidCredentialsError:
            raise AuthError(f"{self.what}: login failed for user '{self.opts.user}'") from None
        except requests.exceptions.SSLError as exc:
            raise ConfigError(f"{self.what}: TLS refused ({exc.__class__.__name__})") from None
        except (requests.exceptions.RequestException, WinRMError, OSError) as exc:
            raise TransientError(f"{self.what}: {exc}") from exc
        if result.status_code != 0:
            raise _ps_error(self.what, result.std_err.decode(errors="replace"))
        text = result.std_out.decode("utf-8-sig", errors="replace").strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise PluginError(f"{self.what}: an answer that is not JSON: {text[:80]!r}") from None


def _ps_error(what: str, stderr: str) -> PluginError | NotFound:
    """The first line of a PowerShell error (the cmdlet and its message)."""
    line = next((ln.strip() for ln in stderr.splitlines() if ln.strip()), "PowerShell failed")
    cls = NotFound if any(k in line for k in NOT_FOUND) else PluginError
    return cls(f"{what}: {line}")


def as_list(value: Any) -> list[Any]:
    """ConvertTo-Json writes one object bare and several as an array: always a list."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
