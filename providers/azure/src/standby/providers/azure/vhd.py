"""The fixed-VHD layout Azure imports: the disk's bytes, then a 512-byte footer.

Azure takes a page blob as a managed disk only when its virtual size is a whole number of MiB
and the blob ends with a valid fixed-disk footer (Virtual Hard Disk Image Format Specification,
"Hard Disk Footer Format"). This module builds and checks that footer.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from standby.core.errors import PluginError

FOOTER = 512
SECTOR = 512
MiB = 1 << 20
COOKIE = b"conectix"
FIXED = 2
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_LAYOUT = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
assert _LAYOUT.size == FOOTER


def virtual_size(disk_size: int) -> int:
    """A disk's size rounded up to the whole MiB Azure requires."""
    return -(-disk_size // MiB) * MiB


def blob_size(disk_size: int) -> int:
    """The page blob size for a disk: rounded virtual size plus the footer."""
    return virtual_size(disk_size) + FOOTER


def geometry(size: int) -> tuple[int, int, int]:
    """Cylinders, heads, sectors per track, by the spec's CHS algorithm."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


MAX_CHS = (65535, 16, 255)


def footer_geometry(size: int) -> tuple[int, int, int]:
    """The geometry written in the footer: one whose product is exactly the disk's sectors.

    Tools disagree on a VHD's size: Hyper-V and Azure read `current_size`, while QEMU's vpc
    driver reads the CHS product for creator applications it does not know (QEMU 7.2 takes
    `current_size` only from 'win ', 'qem2', 'd2v ', 'CTXS' and 'tap', or when the geometry
    is the maximum 65535/16/255). The spec's CHS algorithm rounds down (a 256 MiB disk read
    as 64 KiB short), so standby writes the spec's geometry when it is exact, else an exact
    factorisation (heads <= 16, sectors <= 255, cylinders <= 65535), else the maximum
    geometry: every common tool then reads the exact size."""
    sectors = size // SECTOR
    spec = geometry(size)
    if spec[0] * spec[1] * spec[2] == sectors:
        return spec
    for heads in range(16, 0, -1):
        for spt in range(63, 256):
            cyl, rest = divmod(sectors, heads * spt)
            if not rest and cyl <= 65535:
                return cyl, heads, spt
    return MAX_CHS


def checksum(footer: bytes) -> int:
    """One's complement of the byte sum, with the checksum field taken as zero."""
    return ~(sum(footer[:64]) + sum(footer[68:])) & 0xFFFFFFFF


@dataclass(frozen=True)
class Footer:
    """The fields of a fixed-VHD footer that matter here."""

    size: int
    unique_id: bytes
    timestamp: int
    disk_type: int = FIXED

    def pack(self) -> bytes:
        cyl, heads, spt = footer_geometry(self.size)
        raw = _LAYOUT.pack(
            COOKIE,
            2,  # features: reserved bit always set
            0x00010000,
            0xFFFFFFFFFFFFFFFF,  # data offset: none for a fixed disk
            self.timestamp,
            b"stby",
            0x00010000,
            b"Wi2k",
            self.size,
            self.size,
            cyl,
            heads,
            spt,
            self.disk_type,
            0,
            self.unique_id,
            0,
            bytes(427),
        )
        return raw[:64] + struct.pack(">I", checksum(raw)) + raw[68:]


def new_footer(disk_size: int) -> Footer:
    """A footer for a new fixed disk of `disk_size` bytes (rounded to whole MiB)."""
    stamp = int((datetime.now(UTC) - _EPOCH).total_seconds()) & 0xFFFFFFFF
    return Footer(virtual_size(disk_size), uuid.uuid4().bytes, stamp)


def parse_footer(raw: bytes) -> Footer:
    """Check a footer (cookie, checksum, fixed type, MiB alignment); PluginError if invalid."""
    if len(raw) != FOOTER:
        raise PluginError(f"VHD footer is {len(raw)} bytes, not {FOOTER}")
    fields = _LAYOUT.unpack(raw)
    if fields[0] != COOKIE:
        raise PluginError("VHD footer has no 'conectix' cookie")
    stored = struct.unpack(">I", raw[64:68])[0]
    if stored != checksum(raw):
        raise PluginError(f"VHD footer checksum {stored:#010x} != computed {checksum(raw):#010x}")
    if fields[13] != FIXED:
        raise PluginError(f"VHD disk type {fields[13]} is not fixed (2)")
    size = fields[9]
    if size % MiB:
        raise PluginError(f"VHD virtual size {size} is not a whole number of MiB")
    return Footer(size=size, unique_id=fields[15], timestamp=fields[4], disk_type=fields[13])
