"""Sealing a target's own metadata with a vault's key: a site of any target kind that names
`vault = "NAME"` writes its point manifests and VM specs sealed (AES-256-GCM, kind:id as
associated data) instead of in the clear; reading them needs the vault's key file and
passphrase on this machine."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from standby.core.errors import ConfigError

from .crypto import MAGIC, Sealer
from .vault import VaultConfig


class MetaSealer:
    """Seals and opens JSON metadata under one vault's key."""

    def __init__(self, vault: str, sealer: Sealer) -> None:
        self.vault, self.sealer = vault, sealer

    def seal_json(self, kind: str, rid: str, obj: Any) -> bytes:
        return self.sealer.seal(kind, rid, json.dumps(obj).encode())

    def open_json(self, kind: str, rid: str, blob: bytes, where: str) -> Any:
        return json.loads(self.sealer.open(kind, rid, blob, where))


def is_sealed(blob: bytes) -> bool:
    return blob[:4] == MAGIC


@functools.cache
def _sealer(home: Path, vault: str) -> MetaSealer:
    cfg = VaultConfig.load(vault, home)
    key = cfg.key(home).unwrap(cfg.passphrase_value())
    return MetaSealer(vault, Sealer(key))


def site_sealer(home: Path, vault: str | None) -> MetaSealer | None:
    """The sealer of the vault a site names (its passphrase from the vault's reference or
    STANDBY_VAULT_PASSPHRASE), or None when the site names none."""
    return _sealer(home, vault) if vault else None


def open_meta(sealer: MetaSealer | None, kind: str, rid: str, blob: bytes, where: str) -> Any:
    """Metadata as written: sealed (needs the site's vault) or plain JSON (older points)."""
    if is_sealed(blob):
        if sealer is None:
            raise ConfigError(f"{where} is sealed with a vault key; name the vault in the site "
                              "(vault = 'NAME')")  # fmt: skip
        return sealer.open_json(kind, rid, blob, where)
    return json.loads(blob)
