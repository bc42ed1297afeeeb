"""TLS to self-signed management endpoints, verified: a CA file, or a pinned SHA-256.

Platforms standby manages (vCenter, Hyper-V's WinRM listener) often serve self-signed
certificates. Verification is never off: either the chain is checked against `ca_file`, or
the peer's certificate must hash to the site's `thumbprint` before any credential is sent.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from pathlib import Path

from standby.core.errors import ConfigError, TransientError


def sha256_hex(value: str) -> str:
    """A thumbprint as 64 lower-case hex digits (colons allowed in the input)."""
    hexed = value.replace(":", "").lower()
    if len(hexed) != 64 or any(c not in "0123456789abcdef" for c in hexed):
        raise ValueError("thumbprint must be the certificate's SHA-256 (64 hex digits)")
    return hexed


def colons(hexed: str) -> str:
    return ":".join(hexed[i : i + 2] for i in range(0, len(hexed), 2)).upper()


def client_context(thumbprint: str | None, ca_file: str | None) -> ssl.SSLContext:
    """The CA file's chain (or the system's), or, with a thumbprint, no chain check: then the
    caller must `check_pin` every connection."""
    if thumbprint is None:
        return ssl.create_default_context(cafile=ca_file)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_pin(der: bytes, thumbprint: str | None, what: str) -> None:
    """Refuse a certificate that is not the pinned one, naming both."""
    if thumbprint is None:
        return
    seen = hashlib.sha256(der).hexdigest()
    if seen != thumbprint:
        raise ConfigError(
            f"{what} certificate does not match the pinned thumbprint: expected "
            f"{colons(thumbprint)}, seen {colons(seen)}"
        )


def probe(host: str, port: int, thumbprint: str | None, ca_file: str | None, what: str) -> bytes:
    """Connect once and check the identity before any credential is sent; the peer's DER."""
    try:
        with (
            socket.create_connection((host, port), timeout=30) as raw,
            client_context(thumbprint, ca_file).wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True) or b""
            check_pin(der, thumbprint, what)
            return der
    except ssl.SSLCertVerificationError as exc:
        raise ConfigError(
            f"{what}: certificate not trusted ({exc.verify_message}); set ca_file, or pin it "
            "with thumbprint"
        ) from None
    except OSError as exc:
        raise TransientError(f"{what}: {exc}") from exc


def pinned_ca_file(der: bytes, directory: Path) -> Path:
    """The pinned certificate as a one-certificate CA file, for clients that can only verify
    against a CA bundle (requests): every later connection must then present exactly it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"pinned-{hashlib.sha256(der).hexdigest()[:16]}.pem"
    path.write_text(ssl.DER_cert_to_PEM_cert(der))
    return path
