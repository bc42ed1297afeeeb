"""The vault's keys: a random 256-bit vault key, wrapped by a key derived from the passphrase
(Argon2id, parameters stored with it), and the sub-keys every record and chunk is sealed and
named with (HKDF-SHA256 from the vault key).

A sealed record is `b"SBV1" + nonce (12) + AES-256-GCM ciphertext and tag`; its kind and id
are the associated data, so a record cannot be swapped for another (a point's index moved
under another id fails to open). Chunk ids are a keyed BLAKE3 of the plaintext: two vaults
name the same bytes differently, and an id says nothing about the bytes to one without the
key.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from standby.core.errors import AuthError, ConfigError, IntegrityError

MAGIC = b"SBV1"
KEY_FORMAT = "standby-vault-key/1"
MIN_KDF_SECONDS = 0.5


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters, stored beside the wrapped key."""

    salt: str  # base64
    iterations: int
    lanes: int
    memory_kib: int

    def derive(self, passphrase: str) -> bytes:
        kdf = Argon2id(
            salt=base64.b64decode(self.salt),
            length=32,
            iterations=self.iterations,
            lanes=self.lanes,
            memory_cost=self.memory_kib,
        )
        return kdf.derive(passphrase.encode())


def tune(seconds: float = MIN_KDF_SECONDS) -> KdfParams:
    """Parameters whose derivation takes at least `seconds` here (64 MiB, 2 lanes, then more
    passes until slow enough)."""
    salt = base64.b64encode(os.urandom(16)).decode()
    iterations = 1
    while True:
        params = KdfParams(salt=salt, iterations=iterations, lanes=2, memory_kib=64 * 1024)
        start = time.perf_counter()
        params.derive("standby-tune")
        took = time.perf_counter() - start
        if took >= seconds:
            return params
        iterations = max(iterations + 1, int(iterations * seconds / max(took, 1e-3) * 1.1))


@dataclass(frozen=True)
class KeyFile:
    """The wrapped vault key: what `vault key export` writes and a new machine opens with."""

    vault_id: str
    vault_name: str
    kdf: KdfParams
    wrapped: str  # base64 of nonce + AES-GCM(vault key)
    format: str = KEY_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> KeyFile:
        try:
            data: dict[str, Any] = json.loads(text)
            if data.get("format") != KEY_FORMAT:
                raise ValueError(f"format is not {KEY_FORMAT}")
            return cls(
                vault_id=str(data["vault_id"]),
                vault_name=str(data["vault_name"]),
                kdf=KdfParams(**data["kdf"]),
                wrapped=str(data["wrapped"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{where}: not a standby vault key file ({exc})") from None

    def _aad(self) -> bytes:
        return f"vault-key:{self.vault_id}".encode()

    @classmethod
    def wrap(cls, key: bytes, vault_id: str, name: str, passphrase: str, kdf: KdfParams) -> KeyFile:
        nonce = os.urandom(12)
        kek = kdf.derive(passphrase)
        probe = cls(vault_id=vault_id, vault_name=name, kdf=kdf, wrapped="")
        sealed = AESGCM(kek).encrypt(nonce, key, probe._aad())
        return cls(vault_id, name, kdf, base64.b64encode(nonce + sealed).decode())

    def unwrap(self, passphrase: str) -> bytes:
        """The vault key; AuthError (exit 4) for a wrong passphrase."""
        raw = base64.b64decode(self.wrapped)
        try:
            return AESGCM(self.kdf.derive(passphrase)).decrypt(raw[:12], raw[12:], self._aad())
        except InvalidTag:
            raise AuthError(f"wrong passphrase for vault '{self.vault_name}'") from None

    def rewrapped(self, old: str, new: str, seconds: float = MIN_KDF_SECONDS) -> KeyFile:
        """The same vault key under a new passphrase (and fresh KDF parameters)."""
        return KeyFile.wrap(self.unwrap(old), self.vault_id, self.vault_name, new, tune(seconds))


def _subkey(key: bytes, what: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=what).derive(key)


class Sealer:
    """Seals and opens records and chunks with the sub-keys of one vault key."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(_subkey(key, b"standby vault records"))
        self._id_key = _subkey(key, b"standby vault chunk ids")
        self._name_key = _subkey(key, b"standby vault names")

    def chunk_id(self, data: bytes | bytearray | memoryview) -> bytes:
        """The chunk's name: a keyed BLAKE3 of its bytes (32 bytes)."""
        return blake3.blake3(data, key=self._id_key, max_threads=1).digest()

    def name(self, text: str) -> str:
        """An opaque, stable object name for `text` (a VM id): 32 hex digits."""
        return blake3.blake3(text.encode(), key=self._name_key).hexdigest()[:32]

    def seal(self, kind: str, rid: str, data: bytes | bytearray | memoryview) -> bytes:
        nonce = os.urandom(12)
        return MAGIC + nonce + self._aead.encrypt(nonce, bytes(data), f"{kind}:{rid}".encode())

    def open(self, kind: str, rid: str, blob: bytes | memoryview, where: str) -> bytes:
        """The plaintext of a sealed record; IntegrityError naming `where` when it was changed,
        truncated or moved."""
        view = memoryview(blob)
        if len(view) < 32 or view[:4] != MAGIC:
            raise IntegrityError(f"{where}: not a sealed vault record (damaged)")
        try:
            return self._aead.decrypt(bytes(view[4:16]), bytes(view[16:]), f"{kind}:{rid}".encode())
        except InvalidTag:
            raise IntegrityError(f"{where}: failed authentication (tampered or corrupt)") from None
