"""Freeing chunks no point uses (mark and sweep), and `vault check`.

The sweep runs only under the vault's exclusive lock on this machine (writers hold it
shared), so no cycle is between choosing to reuse a chunk and recording that it did. It marks
every chunk any committed point or pending cycle names, then per pack: a pack with no live
chunk loses its table, then its bytes; a pack mostly dead is copied (live sealed blobs as
they are) into a new pack whose table is written before the old table and pack go. A kill
anywhere leaves duplicates or garbage, never a point without its chunks; packs without a
table (a writer killed between the two puts) are garbage the next sweep removes.
"""

from __future__ import annotations

import fcntl
import os
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from standby.core.errors import Busy, IntegrityError, NotFound, StandbyError

from .maps import DiskMap
from .vault import Located, Vault, VaultConfig, new_pack_id, pack_name, retried

REPACK_DEAD_SHARE = 0.5


@contextmanager
def vault_lock(name: str, shared: bool, base: Path | None = None) -> Iterator[None]:
    """The vault's lock on this machine: writers share it, a sweep takes it alone (without
    waiting: Busy when writers hold it)."""
    path = VaultConfig.directory(base) / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX | fcntl.LOCK_NB
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            raise Busy(f"vault '{name}' is being written; its sweep waits") from None
        yield
    finally:
        os.close(fd)


def point_maps(vault: Vault, record: dict[str, object]) -> dict[str, DiskMap]:
    """The disk maps a point or pending record holds."""
    import base64

    import zstandard

    out: dict[str, DiskMap] = {}
    disks = record.get("disks", {})
    assert isinstance(disks, dict)
    for name, d in disks.items():
        blob = zstandard.ZstdDecompressor().decompress(base64.b64decode(d["map"]))
        out[name] = DiskMap.from_bytes(int(d["size"]), vault.chunk, blob)
    return out


def live_chunks(vault: Vault) -> set[bytes]:
    """Every chunk a committed point or a pending cycle names."""
    live: set[bytes] = set()
    for kind in ("points", "pending"):
        for rid in vault.record_ids(kind):
            for m in point_maps(vault, vault.get_record(kind, rid)).values():
                live |= m.chunk_ids()
    return live


@dataclass
class SweepReport:
    packs_deleted: int = 0
    packs_rewritten: int = 0
    chunks_freed: int = 0
    bytes_freed: int = 0


def sweep(vault: Vault) -> SweepReport:
    """Delete what no point uses (call under the exclusive `vault_lock`)."""
    vault.load_index(force=True)
    live = live_chunks(vault)
    tables = set(vault.record_ids("index"))
    rep = SweepReport()
    for name in retried(vault.store.list)("packs/"):  # packs whose table never got written
        if name.rsplit("/", 1)[-1] not in tables:
            retried(vault.store.delete)(name)
            rep.packs_deleted += 1
    for pack in sorted(tables):
        table = vault.pack_table(pack)
        dead = [(c, a) for c, a in table.items() if c not in live or vault.index.get(c) != a]
        if not dead:
            continue
        gone = {c for c, _a in dead}
        kept = [(c, a) for c, a in table.items() if c not in gone]
        rep.chunks_freed += sum(1 for c, _a in dead if c not in live)
        rep.bytes_freed += sum(a.length for _c, a in dead)
        if kept and len(dead) < REPACK_DEAD_SHARE * len(table):
            continue
        if kept:  # copy the live blobs into a new pack first
            data, rows = bytearray(), []
            for cid, at in kept:
                blob = retried(vault.store.get_range)(pack_name(pack), at.offset, at.length)
                rows.append((cid, len(data), len(blob)))
                data += blob
            vault.put_pack(new_pack_id(), bytes(data), rows)
            rep.packs_rewritten += 1
        else:
            rep.packs_deleted += 1
        vault.delete_record("index", pack)
        retried(vault.store.delete)(pack_name(pack))
    vault.load_index(force=True)
    return rep


@dataclass
class CheckReport:
    """What `vault check` found: problems (each names its object) and damaged points."""

    records: int = 0
    packs: int = 0
    chunks: int = 0
    chunks_read: int = 0
    problems: list[str] = field(default_factory=list)
    damaged_points: dict[str, list[str]] = field(default_factory=dict)
    garbage_packs: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def check(vault: Vault, read_data: bool = False) -> CheckReport:
    """Verify every record, every pack's table and size, every point's chunks; with
    `read_data`, every chunk's bytes against its tag and id."""
    rep = CheckReport()
    index: dict[bytes, Located] = {}
    tables = vault.record_ids("index")
    for pack in tables:
        try:
            table = vault.pack_table(pack)
        except IntegrityError as exc:
            rep.problems.append(str(exc))
            continue
        rep.packs += 1
        try:
            size = retried(vault.store.size)(pack_name(pack))
        except NotFound:
            rep.problems.append(f"pack {pack} is missing (its table lists {len(table)} chunks)")
            continue
        for cid, at in table.items():
            if at.offset + at.length > size:
                rep.problems.append(f"pack {pack} is truncated (chunk {cid.hex()[:16]})")
            index.setdefault(cid, at)
    rep.garbage_packs = sum(
        1 for n in retried(vault.store.list)("packs/") if n.rsplit("/", 1)[-1] not in tables
    )
    rep.chunks = len(index)
    bad: set[bytes] = set()
    if read_data:
        bad = _read_all(vault, index, rep)
    for kind in ("points", "pending", "protections"):
        for rid in vault.record_ids(kind):
            rep.records += 1
            try:
                record = vault.get_record(kind, rid)
            except IntegrityError as exc:
                rep.problems.append(str(exc))
                if kind == "points":
                    rep.damaged_points[rid] = ["the point's record itself"]
                continue
            if kind == "protections":
                continue
            for disk, m in point_maps(vault, record).items():
                for cid in sorted(m.chunk_ids()):
                    if cid not in index or cid in bad:
                        why = "missing" if cid not in index else "damaged"
                        if kind == "points":
                            what = f"{disk}: chunk {cid.hex()[:16]} {why}"
                            rep.damaged_points.setdefault(rid, []).append(what)
                        if cid not in index:
                            rep.problems.append(f"{kind}/{rid}: {disk}: chunk {cid.hex()[:16]} "
                                                "missing")  # fmt: skip
    return rep


def _read_all(vault: Vault, index: dict[bytes, Located], rep: CheckReport) -> set[bytes]:
    """Read every pack once and open each chunk; the ids that fail."""
    bad: set[bytes] = set()
    by_pack: dict[str, list[tuple[bytes, Located]]] = defaultdict(list)
    for cid, at in index.items():
        by_pack[at.pack].append((cid, at))
    for pack, rows in sorted(by_pack.items()):
        try:
            data = retried(vault.store.get)(pack_name(pack))
        except StandbyError as exc:
            rep.problems.append(f"pack {pack}: {exc}")
            bad |= {c for c, _a in rows}
            continue
        for cid, at in rows:
            where = f"chunk {cid.hex()[:16]} in pack {pack} at {at.offset}"
            try:
                vault.decode(cid, memoryview(data)[at.offset : at.offset + at.length], where)
                rep.chunks_read += 1
            except IntegrityError as exc:
                rep.problems.append(str(exc))
                bad.add(cid)
    return bad
