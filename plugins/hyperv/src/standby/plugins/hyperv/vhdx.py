"""A reader of VHDX files as MS-VHDX lays them out: headers, region table, metadata, BAT.

Used to read a checkpoint's disk over a file share (Hyper-V's own disks are VHDX) and to know
which blocks hold data, so a full read skips what was never written. `source` is any object
with `pread(length, offset) -> bytes` (a local file, an SMB file), so the reader works the
same on both. Format facts (MS-VHDX 2.x): two headers at 64 and 128 KiB, the newer valid one
wins; a header with a non-zero log GUID has writes not yet applied (the file must be opened
by Hyper-V first: refused); the BAT holds one 64-bit entry per payload block (state in bits
0-2, file offset in MiB in bits 20-63), with one sector-bitmap entry after every `chunk
ratio` payload entries; GUIDs are stored little-endian (Windows layout).
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from standby.core.errors import PluginError

KiB, MiB = 1 << 10, 1 << 20
BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 1, 2, 3, 6, 7
HAS_PARENT = 2


class Source(Protocol):
    def pread(self, length: int, offset: int) -> bytes: ...


class LocalFile:
    """A local file as a `Source`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class Layout:
    """What a VHDX's metadata says."""

    size: int
    block_size: int
    sector_size: int
    has_parent: bool
    bat: tuple[int, ...]

    @property
    def chunk_ratio(self) -> int:
        return (1 << 23) * self.sector_size // self.block_size

    def entry(self, block: int) -> int:
        return self.bat[block + block // self.chunk_ratio]


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
    block_size, flags = struct.unpack("<II", items[FILE_PARAMETERS][:8])
    size = struct.unpack("<Q", items[VIRTUAL_DISK_SIZE][:8])[0]
    sector = struct.unpack("<I", items[LOGICAL_SECTOR_SIZE][:4])[0]
    bat_off, bat_len = regions[BAT_GUID]
    raw = src.pread(bat_len, bat_off)
    bat = struct.unpack(f"<{bat_len // 8}Q", raw[: bat_len // 8 * 8])
    return Layout(size, block_size, sector, bool(flags & HAS_PARENT), bat)


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


def _metadata(raw: bytes, where: str) -> dict[uuid.UUID, bytes]:
    if raw[:8] != b"metadata":
        raise PluginError(f"{where}: VHDX metadata region is damaged")
    count = struct.unpack_from("<H", raw, 10)[0]
    out = {}
    for i in range(count):
        e = raw[32 + 32 * i : 64 + 32 * i]
        off, length = struct.unpack_from("<II", e, 16)
        out[uuid.UUID(bytes_le=e[:16])] = raw[off : off + length]
    for need in (FILE_PARAMETERS, VIRTUAL_DISK_SIZE, LOGICAL_SECTOR_SIZE):
        if need not in out:
            raise PluginError(f"{where}: VHDX metadata lacks {need}")
    return out


class VhdxReader:
    """Guest-visible bytes and allocated ranges of one VHDX (not a differencing one yet)."""

    def __init__(self, src: Source, where: str) -> None:
        self.src, self.where = src, where
        self.layout = open_layout(src, where)
        if self.layout.has_parent:
            raise PluginError(f"{where}: differencing VHDX files are not read yet")

    @property
    def size(self) -> int:
        return self.layout.size

    def allocated(self) -> Iterator[tuple[int, int]]:
        """(start, end) of blocks that hold data, merged, in order."""
        lay = self.layout
        start = None
        blocks = -(-lay.size // lay.block_size)
        for b in range(blocks):
            full = lay.entry(b) & 7 == FULLY_PRESENT
            if full and start is None:
                start = b * lay.block_size
            elif not full and start is not None:
                yield start, b * lay.block_size
                start = None
        if start is not None:
            yield start, lay.size

    def read_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several (offset, length) ranges, with one batched read of the file when the source
        has `pread_many` (an SMB file: the requests in flight together)."""
        lay = self.layout
        wanted: list[tuple[int, int]] = []  # file ranges to fetch
        plans: list[list[tuple[int, int]]] = []  # per range: (index into wanted or -1, length)
        for offset, length in ranges:
            if offset < 0 or offset + length > self.size:
                raise PluginError(f"{self.where}: read beyond the disk ({offset}+{length})")
            plan = []
            while length > 0:
                block, within = divmod(offset, lay.block_size)
                n = min(length, lay.block_size - within)
                entry = lay.entry(block)
                if entry & 7 == FULLY_PRESENT:
                    plan.append((len(wanted), n))
                    wanted.append(((entry >> 20) * MiB + within, n))
                else:
                    plan.append((-1, n))
                offset, length = offset + n, length - n
            plans.append(plan)
        many = getattr(self.src, "pread_many", None)
        got = many(wanted) if many else [self.src.pread(n, o) for o, n in wanted]
        if any(len(g) != n for g, (_o, n) in zip(got, wanted, strict=True)):
            raise PluginError(f"{self.where}: short read in a batch")
        return [b"".join(got[i] if i >= 0 else bytes(n) for i, n in plan) for plan in plans]

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at `offset` (within the disk); unallocated blocks read as zeroes."""
        return self.read_many([(offset, length)])[0]
