"""VHDX files as MS-VHDX lays them out: a reader (chains included) and a writer.

Hyper-V's disks are VHDX. The source reads a checkpoint's frozen disk (and, for a VM with
checkpoints of its own, the differencing chain under it) over a file share; the target writes
one differencing VHDX per recovery point on the DR host's share. `src` is any object with
`pread(length, offset) -> bytes` (a local file, an SMB file); a writer's file also has
`pwrite_many([(offset, data)])` and `flush()`.

Format facts (MS-VHDX 2.x): two headers at 64 and 128 KiB, the newer valid one wins (CRC-32C);
a header with a non-zero log GUID has writes not yet applied (refused: Hyper-V must open the
file first); two region tables (BAT, metadata); the BAT holds one 64-bit entry per payload
block (state in bits 0-2, file offset in MiB in bits 20-63) with one sector-bitmap entry after
every `chunk ratio` payload entries. In a differencing file a PARTIALLY_PRESENT block has one
bit per sector in its chunk's sector-bitmap block (set: the sector is in this file; clear: read
the parent), NOT_PRESENT means "ask the parent", ZERO reads as zeroes; the parent locator names
the parent by its DataWriteGuid (`parent_linkage`) and by path. GUIDs are stored little-endian.
"""

from __future__ import annotations

import os
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from standby.core.errors import PluginError

KiB, MiB = 1 << 10, 1 << 20
BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_LOCATOR = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")
NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 1, 2, 3, 6, 7
SB_PRESENT = 6
HAS_PARENT = 2
SECTOR = 512

# Where the writer puts things (all MiB-aligned, as the format asks).
LOG_AT, META_AT, BAT_AT = 1 * MiB, 2 * MiB, 3 * MiB
LOCATOR_AT = 64 * KiB + 4 * KiB  # within the metadata region: room to rewrite it in place
LOCATOR_MAX = 60 * KiB


class Source(Protocol):
    def pread(self, length: int, offset: int) -> bytes: ...


class WritableFile(Source, Protocol):
    def pwrite_many(self, pieces: list[tuple[int, bytes | bytearray | memoryview]]) -> None: ...

    def flush(self) -> None: ...


class LocalFile:
    """A local file as a `Source` (and a `WritableFile` when opened for writing)."""

    def __init__(self, path: str | os.PathLike[str], write: bool = False) -> None:
        flags = os.O_RDWR | os.O_CREAT if write else os.O_RDONLY
        self.fd = os.open(path, flags, 0o644)

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def pwrite_many(self, pieces: list[tuple[int, bytes | bytearray | memoryview]]) -> None:
        for offset, data in pieces:
            os.pwrite(self.fd, data, offset)

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Layout:
    """What a VHDX's headers and metadata say (the BAT as a mutable list for the writer)."""

    size: int
    block_size: int
    sector_size: int
    has_parent: bool
    bat: list[int]
    bat_offset: int = BAT_AT
    data_write_guid: uuid.UUID = field(default_factory=uuid.uuid4)
    disk_id: uuid.UUID = field(default_factory=uuid.uuid4)
    parent: dict[str, str] = field(default_factory=dict)
    """The parent locator's entries (`parent_linkage`, `relative_path`, `absolute_win32_path`)."""
    locator_at: int = 0
    """File offset of the parent locator item (0: none)."""

    @property
    def chunk_ratio(self) -> int:
        return (1 << 23) * self.sector_size // self.block_size

    @property
    def blocks(self) -> int:
        return -(-self.size // self.block_size)

    def index(self, block: int) -> int:
        """The BAT index of payload block `block`."""
        return block + block // self.chunk_ratio

    def entry(self, block: int) -> int:
        return self.bat[self.index(block)]

    def bitmap_index(self, block: int) -> int:
        """The BAT index of the sector-bitmap entry of `block`'s chunk."""
        chunk = block // self.chunk_ratio
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio


def bat_entries(size: int, block_size: int, sector: int, differencing: bool) -> int:
    """How many BAT entries a file of this shape has (MS-VHDX 2.5)."""
    ratio = (1 << 23) * sector // block_size
    blocks = -(-size // block_size)
    if differencing:
        return -(-blocks // ratio) * (ratio + 1)
    return blocks + (blocks - 1) // ratio if blocks else 0


def _table() -> list[int]:
    out = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ (0x82F63B78 & -(n & 1))
        out.append(n)
    return out


_CRC32C = _table()


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of VHDX headers and region tables (at most 64 KiB,
    read once per open: a table in Python is fast enough)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _checked(raw: bytes, size: int) -> bool:
    """A header or region table whose CRC-32C (bytes 4-8, computed as zero) holds."""
    stored = struct.unpack_from("<I", raw, 4)[0]
    return bool(_crc32c(raw[:4] + b"\0\0\0\0" + raw[8:size]) == stored)


def _sealed(raw: bytearray) -> bytes:
    struct.pack_into("<I", raw, 4, 0)
    struct.pack_into("<I", raw, 4, _crc32c(bytes(raw)))
    return bytes(raw)


def open_layout(src: Source, where: str) -> Layout:
    """Parse the headers, region table, metadata and BAT; PluginError naming `where`."""
    if src.pread(8, 0) != b"vhdxfile":
        raise PluginError(f"{where} is not a VHDX file")
    headers = []
    for offset in (64 * KiB, 128 * KiB):
        raw = src.pread(4 * KiB, offset)
        if raw[:4] == b"head" and _checked(raw, 4 * KiB):
            headers.append(raw)
    if not headers:
        raise PluginError(f"{where}: no valid VHDX header")
    head = max(headers, key=lambda h: struct.unpack_from("<Q", h, 8)[0])
    if uuid.UUID(bytes_le=head[48:64]).int != 0:
        raise PluginError(f"{where}: the VHDX has log entries not yet applied; open it on Hyper-V")
    regions = _regions(src, where)
    meta_off, meta_len = regions[METADATA_GUID]
    items = _metadata(src.pread(meta_len, meta_off), where)
    block_size, flags = struct.unpack("<II", items[FILE_PARAMETERS][1][:8])
    size = struct.unpack("<Q", items[VIRTUAL_DISK_SIZE][1][:8])[0]
    sector = struct.unpack("<I", items[LOGICAL_SECTOR_SIZE][1][:4])[0]
    disk_id = (
        uuid.UUID(bytes_le=items[VIRTUAL_DISK_ID][1][:16])
        if VIRTUAL_DISK_ID in items
        else uuid.UUID(int=0)
    )
    parent: dict[str, str] = {}
    locator_at = 0
    if flags & HAS_PARENT:
        if PARENT_LOCATOR not in items:
            raise PluginError(f"{where}: differencing VHDX without a parent locator")
        at, raw_loc = items[PARENT_LOCATOR]
        parent = _locator(raw_loc, where)
        locator_at = meta_off + at
    bat_off = regions[BAT_GUID][0]
    count = bat_entries(size, block_size, sector, bool(flags & HAS_PARENT))
    raw = src.pread(count * 8, bat_off)
    if len(raw) < count * 8:
        raise PluginError(f"{where}: the BAT is cut short")
    bat = list(struct.unpack(f"<{count}Q", raw))
    return Layout(
        size, block_size, sector, bool(flags & HAS_PARENT), bat, bat_off,
        uuid.UUID(bytes_le=head[32:48]), disk_id, parent, locator_at,
    )  # fmt: skip


def _regions(src: Source, where: str) -> dict[uuid.UUID, tuple[int, int]]:
    for offset in (192 * KiB, 256 * KiB):
        raw = src.pread(64 * KiB, offset)
        if raw[:4] == b"regi" and _checked(raw, 64 * KiB):
            count = struct.unpack_from("<I", raw, 8)[0]
            out = {}
            for i in range(count):
                e = raw[16 + 32 * i : 48 + 32 * i]
                off, length = struct.unpack_from("<QI", e, 16)
                out[uuid.UUID(bytes_le=e[:16])] = (off, length)
            if BAT_GUID in out and METADATA_GUID in out:
                return out
    raise PluginError(f"{where}: no valid VHDX region table")


def _metadata(raw: bytes, where: str) -> dict[uuid.UUID, tuple[int, bytes]]:
    """Each item: (its offset in the region, its bytes)."""
    if raw[:8] != b"metadata":
        raise PluginError(f"{where}: VHDX metadata region is damaged")
    count = struct.unpack_from("<H", raw, 10)[0]
    out = {}
    for i in range(count):
        e = raw[32 + 32 * i : 64 + 32 * i]
        off, length = struct.unpack_from("<II", e, 16)
        out[uuid.UUID(bytes_le=e[:16])] = (off, raw[off : off + length])
    for need in (FILE_PARAMETERS, VIRTUAL_DISK_SIZE, LOGICAL_SECTOR_SIZE):
        if need not in out:
            raise PluginError(f"{where}: VHDX metadata lacks {need}")
    return out


def _locator(raw: bytes, where: str) -> dict[str, str]:
    if uuid.UUID(bytes_le=raw[:16]) != VHDX_LOCATOR:
        raise PluginError(f"{where}: the parent is not a VHDX (unknown parent locator type)")
    count = struct.unpack_from("<H", raw, 18)[0]
    out = {}
    for i in range(count):
        ko, vo, kl, vl = struct.unpack_from("<IIHH", raw, 20 + 12 * i)
        out[raw[ko : ko + kl].decode("utf-16-le")] = raw[vo : vo + vl].decode("utf-16-le")
    if "parent_linkage" not in out:
        raise PluginError(f"{where}: the parent locator has no parent_linkage")
    return out


def locator_bytes(entries: dict[str, str]) -> bytes:
    """A VHDX parent locator item holding `entries` (UTF-16LE keys and values)."""
    head = bytearray(VHDX_LOCATOR.bytes_le + struct.pack("<HH", 0, len(entries)))
    table, blob = bytearray(), bytearray()
    base = 20 + 12 * len(entries)
    for key, value in entries.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        ko = base + len(blob)
        blob += k
        vo = base + len(blob)
        blob += v
        table += struct.pack("<IIHH", ko, vo, len(k), len(v))
    out = bytes(head + table + blob)
    if len(out) > LOCATOR_MAX:
        raise PluginError("parent locator too long (parent path too long)")
    return out


def linkage(guid: uuid.UUID) -> str:
    """A DataWriteGuid as `parent_linkage` wants it: lowercase, in braces."""
    return "{" + str(guid) + "}"


# ---------------------------------------------------------------- reading


class VhdxReader:
    """Guest-visible bytes and allocated ranges of one VHDX and, for a differencing file, of
    its chain: `open_parent(locator entries, child's where)` returns the parent's source and
    name (the chain's files are opened as they are met, and the parent's DataWriteGuid must
    be the child's `parent_linkage`)."""

    def __init__(
        self,
        src: Source,
        where: str,
        open_parent: Callable[[dict[str, str], str], tuple[Source, str]] | None = None,
    ) -> None:
        self.src, self.where = src, where
        self.layout = open_layout(src, where)
        self.parent: VhdxReader | None = None
        self._bitmaps: dict[int, bytes] = {}
        self._lock = threading.Lock()
        if self.layout.has_parent:
            if open_parent is None:
                raise PluginError(f"{where}: a differencing VHDX, and its parent cannot be reached")
            psrc, pwhere = open_parent(self.layout.parent, where)
            self.parent = VhdxReader(psrc, pwhere, open_parent)
            want = self.layout.parent["parent_linkage"].lower()
            have = linkage(self.parent.layout.data_write_guid)
            if want not in (have, self.layout.parent.get("parent_linkage2", "").lower()):
                raise PluginError(
                    f"{where}: its parent {pwhere} has changed since the child was made "
                    f"(DataWriteGuid {have}, expected {want})"
                )

    @classmethod
    def alone(cls, src: Source, where: str, layout: Layout) -> VhdxReader:
        """A reader of one file's own content (a differencing file without its parent: what
        it holds itself, for merging it or proving its writes)."""
        self = cls.__new__(cls)
        self.src, self.where, self.layout, self.parent = src, where, layout, None
        self._bitmaps, self._lock = {}, threading.Lock()
        return self

    def held(self) -> list[tuple[int, int]]:
        """(start, end) of the guest ranges this file itself defines: present blocks and
        sectors, and ZERO blocks."""
        lay = self.layout
        out: list[tuple[int, int]] = []
        for b in range(lay.blocks):
            state = lay.entry(b) & 7
            start = b * lay.block_size
            n = min(lay.block_size, lay.size - start)
            if state in (FULLY_PRESENT, ZERO):
                out.append((start, start + n))
            elif state == PARTIALLY_PRESENT:
                at = start
                for here, m in self._present(b, 0, n):
                    if here:
                        out.append((at, at + m))
                    at += m
        return out

    @property
    def size(self) -> int:
        return self.layout.size

    def chain(self) -> list[VhdxReader]:
        """This file and its ancestors, child first."""
        out: list[VhdxReader] = [self]
        while out[-1].parent is not None:
            out.append(out[-1].parent)
        return out

    def close(self) -> None:
        """Close the sources of the ancestors this reader opened (not its own)."""
        for r in self.chain()[1:]:
            closer = getattr(r.src, "close", None)
            if closer is not None:
                closer()

    def _bitmap(self, block: int) -> bytes:
        lay = self.layout
        chunk = block // lay.chunk_ratio
        with self._lock:
            got = self._bitmaps.get(chunk)
        if got is None:
            entry = lay.bat[lay.bitmap_index(block)]
            if entry & 7 != SB_PRESENT:
                raise PluginError(f"{self.where}: a partially present block without its bitmap")
            got = self.src.pread(MiB, (entry >> 20) * MiB)
            with self._lock:
                self._bitmaps[chunk] = got
        return got

    def _present(self, block: int, within: int, n: int) -> list[tuple[bool, int]]:
        """Runs of (in this file?, length) for bytes [within, within+n) of a partial block."""
        lay = self.layout
        bitmap = self._bitmap(block)
        first = (block % lay.chunk_ratio) * (lay.block_size // lay.sector_size)
        runs: list[tuple[bool, int]] = []
        at, end = within, within + n
        while at < end:
            sector = first + at // lay.sector_size
            here = bool(bitmap[sector >> 3] >> (sector & 7) & 1)
            step = min(end, (at // lay.sector_size + 1) * lay.sector_size) - at
            if runs and runs[-1][0] == here:
                runs[-1] = (here, runs[-1][1] + step)
            else:
                runs.append((here, step))
            at += step
        return runs

    def plan(self, offset: int, length: int, out: list[tuple[VhdxReader | None, int, int]]) -> None:
        """Append (file or None for zeroes, file offset, length) pieces for a guest range."""
        lay = self.layout
        while length > 0:
            if offset >= lay.size:  # a child bigger than its parent: zeroes past the parent
                out.append((None, 0, length))
                return
            block, within = divmod(offset, lay.block_size)
            n = min(length, lay.block_size - within, lay.size - offset)
            entry = lay.entry(block)
            state, base = entry & 7, (entry >> 20) * MiB
            if state == FULLY_PRESENT:
                out.append((self, base + within, n))
            elif state == PARTIALLY_PRESENT and self.parent is not None:
                at = offset
                for here, m in self._present(block, within, n):
                    if here:
                        out.append((self, base + at - block * lay.block_size, m))
                    else:
                        self.parent.plan(at, m, out)
                    at += m
            elif state == NOT_PRESENT and self.parent is not None:
                self.parent.plan(offset, n, out)
            else:
                out.append((None, 0, n))
            offset, length = offset + n, length - n

    def allocated(self) -> Iterator[tuple[int, int]]:
        """(start, end) of blocks that hold data anywhere in the chain, merged, in order."""
        lay = self.layout
        held = [r.layout for r in self.chain()]
        start = None
        for b in range(lay.blocks):
            here = False
            for lv in held:
                if b * lay.block_size >= lv.size:
                    continue
                lb = b * lay.block_size // lv.block_size
                state = lv.entry(lb) & 7 if lb < lv.blocks else NOT_PRESENT
                if state in (FULLY_PRESENT, PARTIALLY_PRESENT):
                    here = True
                    break
                if state != NOT_PRESENT or not lv.has_parent:
                    break
            if here and start is None:
                start = b * lay.block_size
            elif not here and start is not None:
                yield start, b * lay.block_size
                start = None
        if start is not None:
            yield start, lay.size

    def read_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several (offset, length) ranges, with one batched read per file of the chain when
        its source has `pread_many` (an SMB file: the requests in flight together)."""
        plans: list[list[tuple[VhdxReader | None, int, int]]] = []
        for offset, length in ranges:
            if offset < 0 or offset + length > self.size:
                raise PluginError(f"{self.where}: read beyond the disk ({offset}+{length})")
            plan: list[tuple[VhdxReader | None, int, int]] = []
            self.plan(offset, length, plan)
            plans.append(plan)
        wanted: dict[int, list[tuple[int, int]]] = {}
        files: dict[int, VhdxReader] = {}
        for plan in plans:
            for r, off, n in plan:
                if r is not None:
                    files[id(r)] = r
                    wanted.setdefault(id(r), []).append((off, n))
        got: dict[int, Iterator[bytes]] = {}
        for key, reqs in wanted.items():
            src = files[key].src
            many = getattr(src, "pread_many", None)
            data = many(reqs) if many else [src.pread(n, o) for o, n in reqs]
            for piece, (_o, n) in zip(data, reqs, strict=True):
                if len(piece) != n:
                    raise PluginError(f"{files[key].where}: short read in a batch")
            got[key] = iter(data)
        return [
            b"".join(next(got[id(r)]) if r is not None else bytes(n) for r, _o, n in plan)
            for plan in plans
        ]

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at `offset` (within the disk); unallocated blocks read as zeroes."""
        return self.read_many([(offset, length)])[0]


# ---------------------------------------------------------------- writing


def create(
    f: WritableFile,
    size: int,
    *,
    block_size: int = 2 * MiB,
    sector_size: int = SECTOR,
    parent: dict[str, str] | None = None,
    disk_id: uuid.UUID | None = None,
) -> Layout:
    """Write a new, empty dynamic VHDX (differencing when `parent` locator entries are given)
    into `f`: file identifier, both headers, both region tables, an empty log, the metadata
    and a BAT of NOT_PRESENT entries. Returns its layout."""
    if size <= 0 or size % sector_size or size > 64 << 40:
        raise PluginError(f"a VHDX cannot have a virtual size of {size} bytes")
    entries = bat_entries(size, block_size, sector_size, parent is not None)
    bat_len = max(MiB, -(-entries * 8 // MiB) * MiB)
    data_guid = uuid.uuid4()
    ident = bytearray(64 * KiB)
    ident[:8] = b"vhdxfile"
    creator = "standby".encode("utf-16-le")
    ident[8 : 8 + len(creator)] = creator
    pieces: list[tuple[int, bytes | bytearray | memoryview]] = [(0, bytes(ident))]
    file_guid = uuid.uuid4()
    for seq, at in ((1, 64 * KiB), (2, 128 * KiB)):
        head = bytearray(4 * KiB)
        head[:4] = b"head"
        struct.pack_into("<Q", head, 8, seq)
        head[16:32], head[32:48] = file_guid.bytes_le, data_guid.bytes_le
        struct.pack_into("<HHIQ", head, 64, 0, 1, MiB, LOG_AT)
        pieces.append((at, _sealed(head)))
    regions = bytearray(64 * KiB)
    regions[:4] = b"regi"
    struct.pack_into("<I", regions, 8, 2)
    for i, (guid, at, length) in enumerate(
        ((BAT_GUID, BAT_AT, bat_len), (METADATA_GUID, META_AT, MiB))
    ):
        regions[16 + 32 * i : 32 + 32 * i] = guid.bytes_le
        struct.pack_into("<QII", regions, 32 + 32 * i, at, length, 1)
    sealed = _sealed(regions)
    pieces += [(192 * KiB, sealed), (256 * KiB, sealed), (LOG_AT, bytes(MiB))]
    meta = bytearray(64 * KiB + 8 * KiB)
    meta[:8] = b"metadata"
    ident_disk = disk_id or uuid.uuid4()
    items: list[tuple[uuid.UUID, int, bytes, int]] = [  # (guid, offset, bytes, flags)
        (FILE_PARAMETERS, 64 * KiB, struct.pack("<II", block_size, HAS_PARENT if parent else 0), 4),
        (VIRTUAL_DISK_SIZE, 64 * KiB + 8, struct.pack("<Q", size), 6),
        (VIRTUAL_DISK_ID, 64 * KiB + 16, ident_disk.bytes_le, 6),
        (LOGICAL_SECTOR_SIZE, 64 * KiB + 32, struct.pack("<I", sector_size), 6),
        (PHYSICAL_SECTOR_SIZE, 64 * KiB + 36, struct.pack("<I", 4096), 6),
    ]
    locator = b""
    if parent is not None:
        locator = locator_bytes(parent)
        items.append((PARENT_LOCATOR, LOCATOR_AT, locator, 4))
    struct.pack_into("<H", meta, 10, len(items))
    for i, (guid, at, data, flags) in enumerate(items):
        meta[32 + 32 * i : 48 + 32 * i] = guid.bytes_le
        struct.pack_into("<III", meta, 48 + 32 * i, at, len(data), flags)
        meta[at : at + len(data)] = data
    pieces += [(META_AT, bytes(meta)), (BAT_AT, bytes(bat_len))]
    f.pwrite_many(pieces)
    f.flush()
    return Layout(
        size, block_size, sector_size, parent is not None, [0] * entries, BAT_AT, data_guid,
        ident_disk, dict(parent or {}), META_AT + LOCATOR_AT if parent else 0,
    )  # fmt: skip


def set_data_write_guid(f: WritableFile, guid: uuid.UUID) -> None:
    """Give the file a new DataWriteGuid (both headers, a higher sequence number each): what
    a merge does to the file that took its child's data and identity."""
    heads = [bytearray(f.pread(4 * KiB, at)) for at in (64 * KiB, 128 * KiB)]
    seq = max(struct.unpack_from("<Q", h, 8)[0] for h in heads)
    pieces: list[tuple[int, bytes | bytearray | memoryview]] = []
    for i, (head, at) in enumerate(zip(heads, (64 * KiB, 128 * KiB), strict=True)):
        if head[:4] != b"head":
            raise PluginError("not a VHDX header")
        struct.pack_into("<Q", head, 8, seq + 1 + i)
        head[32:48] = guid.bytes_le
        pieces.append((at, _sealed(head)))
    f.pwrite_many(pieces[:1])
    f.flush()
    f.pwrite_many(pieces[1:])
    f.flush()


def relink(f: WritableFile, lay: Layout, parent: dict[str, str] | None) -> None:
    """Point a differencing file at another parent (after its old parent was merged into it),
    or make it a plain dynamic file (`None`: it now holds everything). The locator is
    rewritten in place; the file's own DataWriteGuid is kept (its guest data did not
    change, so its children stay linked)."""
    meta = bytearray(f.pread(64 * KiB, META_AT))
    count = struct.unpack_from("<H", meta, 10)[0]
    writes: list[tuple[int, bytes | bytearray | memoryview]] = []
    for i in range(count):
        guid = uuid.UUID(bytes_le=bytes(meta[32 + 32 * i : 48 + 32 * i]))
        at = struct.unpack_from("<I", meta, 48 + 32 * i)[0]
        if guid == FILE_PARAMETERS:
            writes.append(
                (META_AT + at, struct.pack("<II", lay.block_size, HAS_PARENT if parent else 0))
            )
        if guid == PARENT_LOCATOR and parent is not None:
            loc = locator_bytes(parent)
            struct.pack_into("<I", meta, 52 + 32 * i, len(loc))
            writes.append((META_AT + at, loc))
    writes.insert(0, (META_AT, bytes(meta[: 32 + 32 * count])))
    f.pwrite_many(writes)
    f.flush()
    lay.has_parent, lay.parent = parent is not None, dict(parent or {})


class VhdxWriter:
    """Writes guest bytes into a VHDX made by `create` (or reopened to resume): blocks are
    appended at the end of the file and the BAT and sector bitmaps reach the file at
    `flush`, after the data they point to, so a kill leaves a file whose BAT only names
    written blocks. Sector-granular: in a differencing file a block written in part is
    PARTIALLY_PRESENT with its sectors marked in the chunk's bitmap (the rest comes from the
    parent). Callers serialise writes per file (the engine writes a disk from one thread at a
    time per range, so a lock is held here)."""

    def __init__(self, f: WritableFile, where: str, layout: Layout, file_size: int) -> None:
        self.f, self.where, self.lay = f, where, layout
        self.end = max(-(-file_size // MiB) * MiB, layout.bat_offset + max(
            MiB, -(-len(layout.bat) * 8 // MiB) * MiB))  # fmt: skip
        self.written_to = file_size
        self._bitmaps: dict[int, bytearray] = {}
        self._dirty_bat: set[int] = set()
        self._dirty_maps: set[int] = set()
        self._lock = threading.Lock()
        self._flushing = threading.Lock()

    @classmethod
    def reopen(cls, f: WritableFile, where: str, file_size: int) -> VhdxWriter:
        return cls(f, where, open_layout(f, where), file_size)

    def _set(self, index: int, value: int) -> None:
        self.lay.bat[index] = value
        self._dirty_bat.add(index // 512)

    def _alloc(self, length: int) -> int:
        at, self.end = self.end, self.end + length
        return at

    def _bitmap(self, block: int) -> bytearray:
        lay = self.lay
        chunk = block // lay.chunk_ratio
        got = self._bitmaps.get(chunk)
        if got is None:
            entry = lay.bat[lay.bitmap_index(block)]
            if entry & 7 == SB_PRESENT:
                got = bytearray(self.f.pread(MiB, (entry >> 20) * MiB).ljust(MiB, b"\0"))
            else:
                got = bytearray(MiB)
                self._set(lay.bitmap_index(block), SB_PRESENT | (self._alloc(MiB) // MiB) << 20)
            self._bitmaps[chunk] = got
        self._dirty_maps.add(chunk)
        return got

    def _mark(self, block: int, within: int, n: int) -> bool:
        """Mark sectors present; True when the whole block now is."""
        lay = self.lay
        bitmap = self._bitmap(block)
        per = lay.block_size // lay.sector_size
        first = (block % lay.chunk_ratio) * per
        lo, hi = first + within // lay.sector_size, first + -(-(within + n) // lay.sector_size)
        for s in range(lo, hi):
            bitmap[s >> 3] |= 1 << (s & 7)
        full_bytes = bitmap[first >> 3 : (first + per) >> 3]
        return full_bytes.count(0xFF) == len(full_bytes)

    def _place(self, offset: int, length: int, zero: bool) -> list[tuple[int, int, int]]:
        """Map a guest range to (file offset, data offset, length) writes, allocating blocks
        and updating the BAT/bitmaps in memory. For `zero`, whole blocks become ZERO and
        nothing is returned for them."""
        lay = self.lay
        if offset % lay.sector_size or (length % lay.sector_size and offset + length != lay.size):
            raise PluginError(f"{self.where}: write not sector-aligned ({offset}+{length})")
        if offset < 0 or offset + length > lay.size:
            raise PluginError(f"{self.where}: write beyond the disk ({offset}+{length})")
        out: list[tuple[int, int, int]] = []
        done = 0
        while done < length:
            block, within = divmod(offset + done, lay.block_size)
            n = min(length - done, lay.block_size - within)
            whole = within == 0 and (n == lay.block_size or offset + done + n == lay.size)
            idx = lay.index(block)
            entry = lay.bat[idx]
            state = entry & 7
            if zero and whole:
                self._set(idx, ZERO)
                done += n
                continue
            if zero and (state == ZERO or (state == NOT_PRESENT and not lay.has_parent)):
                done += n  # already reads as zeroes
                continue
            if state in (FULLY_PRESENT, PARTIALLY_PRESENT):
                base = (entry >> 20) * MiB
            else:
                base = self._alloc(lay.block_size)
                # Fresh space reads as zeroes: in a plain file (or over a ZERO block) the block
                # is whole at once; in a differencing one the parent shows through the rest.
                state = PARTIALLY_PRESENT if lay.has_parent and state != ZERO else FULLY_PRESENT
                if whole:
                    state = FULLY_PRESENT
                self._set(idx, state | (base // MiB) << 20)
            if state == PARTIALLY_PRESENT and self._mark(block, within, n):
                self._set(idx, FULLY_PRESENT | (base // MiB) << 20)
            out.append((base + within, done, n))
            done += n
        return out

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        with self._lock:
            places = self._place(offset, len(view), zero=False)
        self.f.pwrite_many([(at, view[d : d + n]) for at, d, n in places])
        with self._lock:
            self.written_to = max([self.written_to, *(at + n for at, _d, n in places)])

    def write_zeroes(self, offset: int, length: int) -> None:
        with self._lock:
            places = self._place(offset, length, zero=True)
        zeros = bytes(min(length, self.lay.block_size))
        self.f.pwrite_many([(at, memoryview(zeros)[:n]) for at, _d, n in places])
        with self._lock:
            self.written_to = max([self.written_to, *(at + n for at, _d, n in places)])

    def flush(self) -> None:
        """Data first, then bitmaps and the BAT pages that changed, then the file's flush.
        One flush at a time: a second caller returns only once the first one's BAT is on
        the file (a reader opened after it sees every block)."""
        with self._flushing:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            lay = self.lay
            pieces: list[tuple[int, bytes | bytearray | memoryview]] = []
            if self.written_to < self.end:  # the last block's tail: the file covers it
                pieces.append((self.end - 1, b"\0"))
                self.written_to = self.end
            for chunk in sorted(self._dirty_maps):
                entry = lay.bat[chunk * (lay.chunk_ratio + 1) + lay.chunk_ratio]
                pieces.append(((entry >> 20) * MiB, bytes(self._bitmaps[chunk])))
            pages = sorted(self._dirty_bat)
            self._dirty_maps.clear()
            self._dirty_bat.clear()
            bat = list(lay.bat)
        if pieces:
            self.f.pwrite_many(pieces)
        if pages:
            batch: list[tuple[int, bytes | bytearray | memoryview]] = []
            for page in pages:
                entries = bat[page * 512 : page * 512 + 512]
                batch.append(
                    (lay.bat_offset + page * 4096, struct.pack(f"<{len(entries)}Q", *entries))
                )
            self.f.pwrite_many(batch)
        self.f.flush()


def merge_into_parent(child: Source, lay: Layout, where: str, parent: VhdxWriter) -> None:
    """Copy what the differencing file `child` itself holds (its present blocks and sectors,
    its ZERO blocks) into its parent, flush, and give the parent the child's DataWriteGuid:
    the parent then reads as the child did, and the child's own children stay linked once
    their locator names the parent's path. Run again after a kill, it copies the same bytes."""
    if parent.lay.size != lay.size:
        raise PluginError(
            f"{where}: cannot merge into a parent of another size "
            f"({parent.lay.size} bytes, the child has {lay.size})"
        )
    view = VhdxReader.alone(child, where, lay)
    for block in range(lay.blocks):
        entry = lay.entry(block)
        state, base = entry & 7, (entry >> 20) * MiB
        start = block * lay.block_size
        n = min(lay.block_size, lay.size - start)
        if state == FULLY_PRESENT:
            parent.write(start, child.pread(n, base))
        elif state == PARTIALLY_PRESENT:
            at = 0
            for here, m in view._present(block, 0, n):
                if here:
                    parent.write(start + at, child.pread(m, base + at))
                at += m
        elif state == ZERO:
            parent.write_zeroes(start, n)
    parent.flush()
    set_data_write_guid(parent.f, lay.data_write_guid)
    parent.lay.data_write_guid = lay.data_write_guid


def locator_for(child: str, parent: str, guid: uuid.UUID) -> dict[str, str]:
    """Parent locator entries for a child at host path `child` over `parent` (DataWriteGuid
    `guid`): the path relative to the child's folder when both are on one drive, and the
    absolute one (`\\\\?\\D:\\...`)."""
    import ntpath

    out = {"parent_linkage": linkage(guid)}
    try:
        rel = ntpath.relpath(parent, ntpath.dirname(child))
    except ValueError:  # another drive or share
        rel = ""
    if rel:
        out["relative_path"] = rel if rel.startswith("..") else ".\\" + rel
    out["absolute_win32_path"] = "\\\\?\\" + parent
    return out


def parent_path(loc: dict[str, str], child: str) -> str:
    """The host path of a child's parent, from its locator: the relative path first (as the
    format says), then the absolute one."""
    import ntpath

    rel = loc.get("relative_path")
    if rel:
        return ntpath.normpath(ntpath.join(ntpath.dirname(child), rel))
    path = loc.get("absolute_win32_path", "")
    if path.startswith("\\\\?\\UNC\\"):
        return "\\\\" + path[8:]
    return path.removeprefix("\\\\?\\")
