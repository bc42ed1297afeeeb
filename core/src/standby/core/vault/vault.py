"""One opened vault: sealed records, content-addressed chunks packed into pack files, and the
local registry that names vaults (`STANDBY_HOME/vaults/NAME.toml` + the wrapped key
`NAME.key`).

Objects in the store:

- `vault.json`: plain: format, vault id, chunk size, and a sealed canary that proves a key
  opens this vault (the wrapped key is NOT in the store: it lives in the registry and in the
  key file `vault key export` writes);
- `packs/XX/ID`: sealed chunks back to back; `index/ID`: the sealed table of a pack (chunk
  id, offset, length), written after its pack, so a pack without a table is garbage;
- `protections/VM`, `points/VM/ID`, `pending/VM/CYCLE`: sealed JSON records (VM names are
  keyed hashes of the VM id: object names say nothing of the VMs).
"""

from __future__ import annotations

import json
import os
import struct
import threading
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import zstandard
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from standby.core.config import SITE_NAME_RE, get_site, home, resolve_secret
from standby.core.errors import AuthError, ConfigError, IntegrityError, NotFound, TransientError

from .crypto import KeyFile, Sealer
from .store import Store, open_store

FORMAT = "standby-vault/1"
CHUNK = 1 << 20
PACK_BYTES = 16 << 20
_ENTRY = struct.Struct("<32sQI")  # chunk id, offset, length in the pack
_T = TypeVar("_T")

_retry = retry(
    retry=retry_if_exception_type(TransientError),
    stop=stop_after_attempt(6),
    wait=wait_exponential(multiplier=0.2, max=5),
    reraise=True,
)


def retried(fn: Callable[..., _T]) -> Callable[..., _T]:
    """A store call retried on TransientError (an unreachable store), 6 tries over ~6 s."""
    return _retry(fn)


# ------------------------------------------------------------------ registry


@dataclass(frozen=True)
class VaultConfig:
    """`vaults/NAME.toml`: where the vault's store is and where its passphrase comes from."""

    name: str
    store: str
    store_site: str | None = None
    passphrase: str | None = None  # a secret reference

    @staticmethod
    def directory(base: Path | None = None) -> Path:
        return (base or home()) / "vaults"

    @classmethod
    def load(cls, name: str, base: Path | None = None) -> VaultConfig:
        path = cls.directory(base) / f"{name}.toml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in cls.directory(base).glob("*.toml")))
            raise NotFound(f"unknown vault '{name}' (configured: {known or 'none'})")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        unknown = set(data) - {"store", "store_site", "passphrase"}
        if unknown or "store" not in data:
            raise ConfigError(f"{path}: keys are store, store_site, passphrase")
        return cls(name, str(data["store"]), data.get("store_site"), data.get("passphrase"))

    def save(self, base: Path | None = None) -> Path:
        if not SITE_NAME_RE.match(self.name):
            raise ConfigError(f"vault name '{self.name}' must be letters, digits, '.', '_', '-'")
        lines = [f"store = {json.dumps(self.store)}"]
        if self.store_site:
            lines.append(f"store_site = {json.dumps(self.store_site)}")
        if self.passphrase:
            lines.append(f"passphrase = {json.dumps(self.passphrase)}")
        path = self.directory(base) / f"{self.name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path

    def register(self, keyfile: KeyFile, base: Path | None = None) -> None:
        """Save this config and the vault's wrapped key here (`NAME.toml`, `NAME.key`)."""
        self.save(base)
        write_private(self.key_path(base), keyfile.to_json())

    def key_path(self, base: Path | None = None) -> Path:
        return self.directory(base) / f"{self.name}.key"

    def key(self, base: Path | None = None) -> KeyFile:
        path = self.key_path(base)
        try:
            return KeyFile.from_json(path.read_text(), str(path))
        except FileNotFoundError:
            raise NotFound(f"vault '{self.name}' has no key here ({path})") from None

    def open_store(self, base: Path | None = None) -> Store:
        site = get_site(self.store_site, base) if self.store_site else None
        return open_store(self.store, site)

    def passphrase_value(self, prompt: Callable[[str], str] | None = None) -> str:
        """The passphrase from the configured reference, else from `prompt`."""
        if self.passphrase:
            return resolve_secret(self.passphrase, f"vault '{self.name}': key 'passphrase'")
        env = os.environ.get("STANDBY_VAULT_PASSPHRASE")
        if env is not None:
            return env
        if prompt is None:
            raise AuthError(
                f"vault '{self.name}' needs its passphrase: set 'passphrase' to a secret "
                "reference or STANDBY_VAULT_PASSPHRASE"
            )
        return prompt(f"passphrase of vault '{self.name}'")


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600 before any byte is in it), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------ the vault


@dataclass(frozen=True)
class Located:
    """Where a chunk's sealed blob is."""

    pack: str
    offset: int
    length: int


class Vault:
    """An opened vault: records and chunks of one store under one key."""

    def __init__(self, name: str, store: Store, sealer: Sealer, info: dict[str, Any]) -> None:
        self.name, self.store, self.sealer = name, store, sealer
        self.vault_id = str(info["id"])
        self.chunk = int(info.get("chunk_size", CHUNK))
        self.index: dict[bytes, Located] = {}
        self.lock = threading.Lock()
        self._loaded = False
        self._local = threading.local()

    # -------------------------------------------------- opening and creating

    @staticmethod
    def create(store: Store, name: str, key: bytes, chunk: int = CHUNK) -> str:
        """Initialise an empty store as a vault; returns the new vault id."""
        if store.list("vault.json") or store.list("packs/"):
            raise ConfigError(f"vault store {store.url} is not empty: it already holds a vault")
        vid = uuid.uuid4().hex
        sealer = Sealer(key)
        canary = {"name": name, "created": datetime.now(UTC).isoformat()}
        info = {
            "format": FORMAT,
            "id": vid,
            "chunk_size": chunk,
            "canary": sealer.seal("vault", vid, json.dumps(canary).encode()).hex(),
        }
        retried(store.put)("vault.json", json.dumps(info, indent=2).encode())
        return vid

    @classmethod
    def open(cls, name: str, store: Store, key: bytes, vault_id: str | None = None) -> Vault:
        """The vault in `store` under `key`; AuthError when the key is another vault's."""
        try:
            info = json.loads(retried(store.get)("vault.json"))
        except NotFound:
            raise NotFound(f"vault store {store.url} holds no vault (no vault.json)") from None
        except ValueError:
            raise IntegrityError(f"vault store {store.url}: vault.json is damaged") from None
        if info.get("format") != FORMAT:
            raise ConfigError(f"vault store {store.url}: unknown format {info.get('format')!r}")
        if vault_id is not None and info.get("id") != vault_id:
            raise AuthError(
                f"vault '{name}': the key is for vault {vault_id}, the store holds {info['id']}"
            )
        sealer = Sealer(key)
        try:
            sealer.open("vault", info["id"], bytes.fromhex(info["canary"]), "vault.json")
        except IntegrityError:
            raise AuthError(f"vault '{name}': the key does not open this store") from None
        return cls(name, store, sealer, info)

    @classmethod
    def opened(
        cls, name: str, base: Path | None = None, prompt: Callable[[str], str] | None = None
    ) -> Vault:
        """The vault registered here as `name`, opened with its passphrase."""
        cfg = VaultConfig.load(name, base)
        keyfile = cfg.key(base)
        key = keyfile.unwrap(cfg.passphrase_value(prompt))
        return cls.open(name, cfg.open_store(base), key, keyfile.vault_id)

    # -------------------------------------------------- records

    def put_record(self, kind: str, rid: str, obj: dict[str, Any]) -> None:
        """Seal `obj` as record kind/rid (JSON, zstd) and write it."""
        body = zstandard.ZstdCompressor(level=3).compress(json.dumps(obj).encode())
        retried(self.store.put)(f"{kind}/{rid}", self.sealer.seal(kind, rid, body))

    def get_record(self, kind: str, rid: str) -> dict[str, Any]:
        name = f"{kind}/{rid}"
        blob = retried(self.store.get)(name)
        body = self.sealer.open(kind, rid, blob, f"vault '{self.name}': record {name}")
        data: dict[str, Any] = json.loads(zstandard.ZstdDecompressor().decompress(body))
        return data

    def record_ids(self, kind: str, prefix: str = "") -> list[str]:
        base = f"{kind}/{prefix}"
        return [n[len(kind) + 1 :] for n in retried(self.store.list)(base)]

    def delete_record(self, kind: str, rid: str) -> None:
        retried(self.store.delete)(f"{kind}/{rid}")

    def vm_tag(self, vm_id: str) -> str:
        return self.sealer.name(vm_id)

    # -------------------------------------------------- chunks

    def load_index(self, force: bool = False) -> None:
        """Read every pack's table (once)."""
        with self.lock:
            if self._loaded and not force:
                return
            index: dict[bytes, Located] = {}
            for pack in self.record_ids("index"):
                for cid, at in self.pack_table(pack).items():
                    index[cid] = at
            self.index, self._loaded = index, True

    def pack_table(self, pack: str) -> dict[bytes, Located]:
        name = f"index/{pack}"
        blob = retried(self.store.get)(name)
        body = self.sealer.open("index", pack, blob, f"vault '{self.name}': {name}")
        return {
            cid: Located(pack, off, n)
            for cid, off, n in _ENTRY.iter_unpack(zstandard.ZstdDecompressor().decompress(body))
        }

    def put_pack(self, pack: str, data: bytes, table: list[tuple[bytes, int, int]]) -> None:
        """Write a pack, then its table (a pack is referenced only once both are stored)."""
        retried(self.store.put)(pack_name(pack), data)
        body = zstandard.ZstdCompressor(level=3).compress(
            b"".join(_ENTRY.pack(c, o, n) for c, o, n in table)
        )
        retried(self.store.put)(f"index/{pack}", self.sealer.seal("index", pack, body))
        with self.lock:
            for cid, off, n in table:
                self.index[cid] = Located(pack, off, n)

    def _zc(self, level: int) -> zstandard.ZstdCompressor:
        cache: dict[int, zstandard.ZstdCompressor] = self._local.__dict__.setdefault("zc", {})
        if level not in cache:
            cache[level] = zstandard.ZstdCompressor(level=level)
        return cache[level]

    def encode(self, cid: bytes, data: bytes | bytearray | memoryview, level: int) -> bytes:
        """A chunk's sealed blob: a flag byte (1 zstd, 0 stored) and its bytes."""
        packed = self._zc(level).compress(data) if level > 0 else b""
        body = b"\x01" + packed if 0 < len(packed) < len(data) else b"\x00" + bytes(data)
        return self.sealer.seal("chunk", cid.hex(), body)

    def decode(self, cid: bytes, blob: bytes | memoryview, where: str) -> bytes:
        """A chunk's bytes from its sealed blob, checked against its id."""
        body = self.sealer.open("chunk", cid.hex(), blob, where)
        data = (
            zstandard.ZstdDecompressor().decompress(body[1:], max_output_size=self.chunk)
            if body[:1] == b"\x01"
            else body[1:]
        )
        if self.sealer.chunk_id(data) != cid:
            raise IntegrityError(f"{where}: bytes do not match the chunk id")
        return data

    def read_chunk(self, cid: bytes) -> bytes:
        """A stored chunk's bytes; IntegrityError naming the chunk when it is missing or bad."""
        self.load_index()
        at = self.index.get(cid)
        if at is None:
            raise IntegrityError(f"vault '{self.name}': chunk {cid.hex()[:16]} is missing")
        where = f"vault '{self.name}': chunk {cid.hex()[:16]} in pack {at.pack}"
        try:
            blob = retried(self.store.get_range)(pack_name(at.pack), at.offset, at.length)
        except NotFound:
            raise IntegrityError(f"{where}: the pack is missing") from None
        return self.decode(cid, blob, where)

    def close(self) -> None:
        self.store.close()


def pack_name(pack: str) -> str:
    return f"packs/{pack[:2]}/{pack}"


def new_pack_id() -> str:
    return uuid.uuid4().hex
