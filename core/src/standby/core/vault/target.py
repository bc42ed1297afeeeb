"""`standby.targets: vault`: recovery points as sealed, deduplicated chunks in a vault.

A site `plugin = "vault"`, `vault = "NAME"` (a vault registered with `standby vault create`
or `vault open`), `compression` (zstd level, 0 = off, default 3) and `run_on` (the site where
a failed-over VM runs: any installed target). A vault runs no VM itself: failover restores
the point through the `run_on` target's own writer into a point there, then fails over that
target; `standby vault failover VM --to SITE` picks another site for one failover.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import zstandard
from pydantic import Field

from standby.core.config import Site, SiteOptions, get_site
from standby.core.errors import Busy, ConfigError, NotFound, PluginError, TransientError
from standby.core.extents import Intervals, normalize, subtract
from standby.core.interfaces import Buffer, ReplicaWriter, Target, TargetCapabilities
from standby.core.model import (
    Extent,
    FailoverResult,
    PointInfo,
    ProtectionInfo,
    Validation,
    VMSpec,
)

from . import gc
from .maps import DiskMap
from .vault import PACK_BYTES, Vault, new_pack_id

MAX_DISK = 64 << 40
RESTORE_PIECE = 4 << 20


class VaultOptions(SiteOptions):
    vault: str
    run_on: str | None = None
    compression: int = Field(default=3, ge=0, le=19)


def encode_maps(maps: Mapping[str, DiskMap]) -> dict[str, Any]:
    zc = zstandard.ZstdCompressor(level=3)
    return {
        name: {"size": m.size, "map": base64.b64encode(zc.compress(m.to_bytes())).decode()}
        for name, m in maps.items()
    }


class VaultWriter(ReplicaWriter):
    """One cycle's chunks and disk maps; `flush` stores the open pack and the pending maps."""

    checkpoint_seconds: ClassVar[float] = 10.0

    def __init__(self, target: VaultTarget, prot: ProtectionInfo, cycle_id: int,
                 maps: dict[str, DiskMap], base: int | None) -> None:  # fmt: skip
        self.target, self.vault = target, target.vault
        self.prot, self.cycle_id, self.maps, self.base = prot, cycle_id, maps, base
        self.tag = self.vault.vm_tag(prot.vm.id)
        self.level = target.opts.compression
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.open_pack: list[tuple[bytes, bytes]] = []  # (chunk id, sealed blob)
        self.open_bytes = 0
        self.unstored: dict[bytes, bytes] = {}  # every chunk not yet in a stored pack
        self.uploading = 0
        self.failed = False
        self.stored = 0

    def _known(self, cid: bytes) -> bool:
        return cid in self.vault.index or cid in self.unstored

    def write(self, disk: str, offset: int, data: Buffer) -> None:
        self.write_many(disk, [(offset, data)])

    def write_many(self, disk: str, pieces: list[tuple[int, Buffer]]) -> None:
        """Cut at chunk boundaries, name, skip the known, compress and seal the rest (outside
        the lock), then add them to the open pack and map them; a full pack is stored by
        this thread outside the lock, so the others go on compressing."""
        size = self.vault.chunk
        cut: list[tuple[int, int, bytes, memoryview]] = []
        for offset, data in pieces:
            view, pos = memoryview(data).cast("B"), 0
            while pos < len(view):
                start = offset + pos
                n = min(len(view) - pos, (start // size + 1) * size - start)
                part = view[pos : pos + n]
                cut.append((start, start + n, self.vault.sealer.chunk_id(part), part))
                pos += n
        blobs = [
            (cid, self.vault.encode(cid, part, self.level))
            for _s, _e, cid, part in cut
            if not self._known(cid)
        ]
        with self.lock:
            for cid, blob in blobs:
                if not self._known(cid):
                    self.unstored[cid] = blob
                    self.open_pack.append((cid, blob))
                    self.open_bytes += len(blob)
            m = self.maps[disk]
            for start, end, cid, _p in cut:
                m.set(start, end, cid)
            full = self._take_pack() if self.open_bytes >= PACK_BYTES else None
        if full:
            self._store(full)

    def _take_pack(self) -> list[tuple[bytes, bytes]]:
        """The open pack, to store (under the lock)."""
        taken, self.open_pack, self.open_bytes = self.open_pack, [], 0
        if taken:
            self.uploading += 1
        return taken

    def _store(self, chunks: list[tuple[bytes, bytes]]) -> None:
        """Write a pack and its table; on failure its chunks go back into the open pack, so
        the engine's retry stores them."""
        rows, at = [], 0
        for cid, blob in chunks:
            rows.append((cid, at, len(blob)))
            at += len(blob)
        try:
            self.vault.put_pack(new_pack_id(), b"".join(b for _c, b in chunks), rows)
        except BaseException:
            with self.lock:
                self.open_pack[:0] = chunks
                self.open_bytes += at
                self.failed = True
                self.uploading -= 1
                self.idle.notify_all()
            raise
        with self.lock:
            for cid, _b in chunks:
                self.unstored.pop(cid, None)
            self.stored += at
            self.uploading -= 1
            self.idle.notify_all()

    def _store_all(self) -> dict[str, Any]:
        """Store the open pack and wait for every pack in flight; returns the disk maps as
        they were when the open pack was taken (every chunk they name is then stored)."""
        with self.lock:
            last = self._take_pack()
            maps = encode_maps(self.maps)
            self.failed = False
        if last:
            self._store(last)
        with self.lock:
            while self.uploading:
                self.idle.wait()
            if self.failed:  # its chunks went back into the open pack
                raise TransientError(f"vault '{self.vault.name}': a pack could not be stored")
        return maps

    def write_zeroes(self, disk: str, extent: Extent) -> None:
        with self.lock:
            self.maps[disk].clear(extent.offset, extent.end)

    def _chunk(self, cid: bytes) -> bytes:
        with self.lock:
            blob = self.unstored.get(cid)
        if blob is not None:
            return self.vault.decode(cid, blob, f"chunk {cid.hex()[:16]} (unstored)")
        return self.vault.read_chunk(cid)

    def read(self, disk: str, extent: Extent) -> Buffer:
        with self.lock:
            pieces = list(self.maps[disk].pieces(extent.offset, extent.end))
        return assemble(extent, pieces, self._chunk)

    def flush(self) -> None:
        record = {"cycle": self.cycle_id, "base": self.base, "disks": self._store_all()}
        self.vault.put_record("pending", f"{self.tag}/{self.cycle_id:010d}", record)

    def unproven(self, disk: str, written: Intervals, planned: Intervals) -> Intervals:
        """What was written but is not in the map (a lost write); chunks themselves are named
        by the keyed hash of the bytes received and sealed."""
        with self.lock:
            mapped = normalize((s, e) for s, e, _c, _k in self.maps[disk].all_pieces())
        return subtract(written, mapped)

    def commit_point(self, point_id: int, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        rid = f"{self.tag}/{point_id:010d}"
        ref = {"vault": self.vault.name, "vm": self.tag, "point": point_id}
        if rid in self.vault.record_ids("points", f"{self.tag}/"):
            return ref
        maps = self._store_all()
        record = {
            "point": point_id,
            "vm": self.prot.vm.to_dict(),
            "source_site": self.prot.source_site,
            "committed_at": datetime.now(UTC).isoformat(),
            "meta": dict(meta or {}),
            "disks": maps,
        }
        self.vault.put_record("points", rid, record)
        self.vault.delete_record("pending", f"{self.tag}/{self.cycle_id:010d}")
        return ref


def assemble(extent: Extent, pieces: list[tuple[int, int, bytes, int]], chunk: Any) -> bytearray:
    """The bytes of `extent` from its mapped pieces (zeroes elsewhere)."""
    out = bytearray(extent.length)
    for lo, hi, cid, skip in pieces:
        data = chunk(cid)
        out[lo - extent.offset : hi - extent.offset] = data[skip : skip + hi - lo]
    return out


class VaultTarget(Target):
    """Points in a vault; failover through the `run_on` site's target."""

    plugin_name = "vault"
    capabilities: ClassVar[TargetCapabilities] = TargetCapabilities(
        test_failover=True,
        max_disk_size=MAX_DISK,
        max_write=4 << 20,
        max_parallel_writes=4,
        write_proof="checked by the vault (each chunk named by a keyed BLAKE3 of the bytes "
        "received and sealed with AES-256-GCM; packs stored whole)",
    )
    run_on_override: ClassVar[str | None] = None
    """Set by `standby vault failover --to SITE` for one command."""

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self.opts = site.options(VaultOptions)
        self._vault: Vault | None = None

    @property
    def home(self) -> Path:
        """The standby home this site's file is in (its vaults are registered there)."""
        return self.site.path.parent.parent

    def connect(self) -> None:
        if self._vault is None:
            self._vault = Vault.opened(self.opts.vault, self.home)

    @property
    def vault(self) -> Vault:
        self.connect()
        assert self._vault is not None
        return self._vault

    def close(self) -> None:
        if self._vault is not None:
            self._vault.close()
            self._vault = None

    def check(self) -> list[str]:
        v = self.vault
        v.load_index()
        return [f"vault '{v.name}' opened ({v.store.url})", f"{len(v.index)} chunks stored"]

    def validate(self, vm: VMSpec) -> Validation:
        problems = [
            f"disk {d.name}: {d.size} bytes is over the vault's {MAX_DISK >> 40} TiB per disk"
            for d in vm.disks
            if d.size > MAX_DISK
        ]
        notes = []
        if not self.opts.run_on:
            notes.append("no run_on site: fail over with `standby vault failover VM --to SITE`")
        return Validation(problems=problems, notes=notes)

    def prepare(self, protection: ProtectionInfo) -> None:
        self.vault.put_record("protections", self.vault.vm_tag(protection.vm.id), {
            "vm": protection.vm.to_dict(),
            "source_site": protection.source_site,
            "target_site": protection.target_site,
            "protected_at": datetime.now(UTC).isoformat(),
        })  # fmt: skip

    def _maps(self, record: dict[str, Any]) -> dict[str, DiskMap]:
        return gc.point_maps(self.vault, record)

    def point_record(self, protection: ProtectionInfo, point_id: int) -> dict[str, Any]:
        tag = self.vault.vm_tag(protection.vm.id)
        try:
            return self.vault.get_record("points", f"{tag}/{point_id:010d}")
        except NotFound:
            raise NotFound(f"vault '{self.vault.name}' has no point {point_id} of VM "
                           f"'{protection.vm.name}'") from None  # fmt: skip

    @contextmanager
    def open_writer(
        self, protection: ProtectionInfo, cycle_id: int, base: PointInfo | None
    ) -> Iterator[ReplicaWriter]:
        with gc.vault_lock(self.vault.name, shared=True, base=self.home):
            self.vault.load_index()
            tag = self.vault.vm_tag(protection.vm.id)
            try:
                maps = self._maps(self.vault.get_record("pending", f"{tag}/{cycle_id:010d}"))
            except NotFound:
                maps = self._maps(self.point_record(protection, base.id)) if base else {}
            for d in protection.vm.disks:
                m = maps.setdefault(d.name, DiskMap(d.size, self.vault.chunk))
                m.resize(d.size)
            yield VaultWriter(self, protection, cycle_id, maps, base.id if base else None)

    def discard_pending(self, protection: ProtectionInfo, cycle_id: int) -> None:
        tag = self.vault.vm_tag(protection.vm.id)
        self.vault.delete_record("pending", f"{tag}/{cycle_id:010d}")

    def sweep(self) -> gc.SweepReport | None:
        """Free what no point uses, unless a writer is busy (then the next prune does)."""
        try:
            with gc.vault_lock(self.vault.name, shared=False, base=self.home):
                return gc.sweep(self.vault)
        except Busy:
            return None

    def prune(
        self, protection: ProtectionInfo, drop: list[PointInfo], keep: list[PointInfo]
    ) -> dict[int, dict[str, Any]]:
        tag = self.vault.vm_tag(protection.vm.id)
        for p in drop:
            self.vault.delete_record("points", f"{tag}/{p.id:010d}")
        if drop:
            self.sweep()
        return {}

    def remove(self, protection: ProtectionInfo, points: list[PointInfo]) -> None:
        tag = self.vault.vm_tag(protection.vm.id)
        for kind in ("points", "pending"):
            for rid in self.vault.record_ids(kind, f"{tag}/"):
                self.vault.delete_record(kind, rid)
        self.vault.delete_record("protections", tag)
        self.sweep()

    # -------------------------------------------------- failover through another site

    def _run_on(self) -> Target:
        name = self.run_on_override or self.opts.run_on
        if not name:
            raise ConfigError(
                f"site '{self.site.name}': a vault runs no VM; set run_on to a site, or use "
                "`standby vault failover VM --to SITE`"
            )
        if name == self.site.name:
            raise ConfigError(f"site '{self.site.name}': run_on cannot be the vault itself")
        from standby.core.plugins import target_class

        site = get_site(name, self.home)
        other = target_class(site.plugin)(site)
        other.on_step = self.on_step
        other.connect()
        return other

    def failover(
        self,
        protection: ProtectionInfo,
        point: PointInfo,
        *,
        test: bool,
        network: str | None = None,
        size: str | None = None,
        failover_id: int | None = None,
    ) -> FailoverResult:
        """Restore `point` into the run_on site (its writer, a point there), then fail that
        site over; the ref names both, so cleanup removes both."""
        record = self.point_record(protection, int(point.ref.get("point", point.id)))
        vm = VMSpec.from_dict(record["vm"])
        other = self._run_on()
        try:
            inner = ProtectionInfo(protection.id, vm, self.site.name, other.site.name)
            verdict = other.validate(vm)
            if not verdict.ok:
                raise PluginError(f"site '{other.site.name}' cannot run VM '{vm.name}': "
                                  + "; ".join(verdict.problems))  # fmt: skip
            self.step(f"restoring point {point.id} from vault '{self.vault.name}' into site "
                      f"'{other.site.name}'")  # fmt: skip
            other.prepare(inner)
            cycle = failover_id or point.id
            with other.open_writer(inner, cycle, None) as w:
                restore_into(self.vault, self._maps(record), w)
                w.flush()
                ref = w.commit_point(point.id, record.get("meta"))
            pinfo = PointInfo(point.id, point.created_at, ref, {d.name: d.size for d in vm.disks})
            res = other.failover(inner, pinfo, test=test, network=network,
                                 size=size or verdict.size, failover_id=failover_id)  # fmt: skip
        finally:
            other.close()
        out = {"run_on": inner.target_site, "restored": ref, "inner": res.ref, "point": point.id}
        return FailoverResult(out, res.vm_name, f"{res.summary} (restored from vault "
                              f"'{self.vault.name}' into site '{inner.target_site}')")  # fmt: skip

    def _inner(self, protection: ProtectionInfo, ref: Mapping[str, Any]) -> tuple[Target, Any]:
        name = ref.get("run_on")
        if not name:
            return None, None  # type: ignore[return-value]
        site = get_site(str(name), self.home)
        from standby.core.plugins import target_class

        other = target_class(site.plugin)(site)
        other.connect()
        return other, ProtectionInfo(protection.id, protection.vm, self.site.name, site.name)

    def cleanup_test(self, protection: ProtectionInfo, ref: Mapping[str, Any]) -> None:
        other, inner = self._inner(protection, ref)
        if other is None:
            return
        with ExitStack() as stack:
            stack.callback(other.close)
            other.cleanup_test(inner, ref.get("inner") or {})
            restored = ref.get("restored")
            pid = int(ref.get("point") or 0)
            points = [PointInfo(pid, datetime.now(UTC), dict(restored), {})] if restored else []
            other.remove(inner, points)

    def commit_failover(self, protection: ProtectionInfo, ref: Mapping[str, Any],
                        point: PointInfo, released: list[PointInfo]) -> None:  # fmt: skip
        """The VM runs at the run_on site now; the vault keeps its points for a later restore
        (retention still applies)."""


def restore_into(vault: Vault, maps: Mapping[str, DiskMap], writer: ReplicaWriter,
                 workers: int = 4) -> int:  # fmt: skip
    """Write every mapped byte of `maps` through `writer` (zeroes are left unwritten: a fresh
    replica reads them as zeroes); returns the bytes written."""

    def one(disk: str, start: int, end: int, pieces: list[tuple[int, int, bytes, int]]) -> int:
        data = assemble(Extent(start, end - start), pieces, vault.read_chunk)
        writer.write(disk, start, data)
        return end - start

    jobs = []
    for disk, m in maps.items():
        for slot in sorted(m.slots):
            lo, hi = slot * m.chunk, min((slot + 1) * m.chunk, m.size)
            pieces = list(m.pieces(lo, hi))
            if pieces:
                start, end = pieces[0][0] // 4096 * 4096, -(-pieces[-1][1] // 4096) * 4096
                jobs.append((disk, start, min(end, m.size), list(m.pieces(start, end))))
    with ThreadPoolExecutor(workers, thread_name_prefix="standby-restore") as pool:
        return sum(pool.map(lambda j: one(*j), jobs))
