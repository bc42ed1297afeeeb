"""Interval arithmetic on disk ranges and the per-block checksum manifest."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable

import blake3

BLOCK = 64 * 1024
"""Manifest granularity: one checksum per 64 KiB block (QEMU's default dirty-bitmap grain)."""
DIGEST = 16
ZERO_DIGEST = bytes(DIGEST)
UNKNOWN_DIGEST = b"\xff" * DIGEST

Intervals = list[tuple[int, int]]
"""Sorted, non-overlapping, non-adjacent half-open [start, end) byte ranges."""


def normalize(ranges: Iterable[tuple[int, int]]) -> Intervals:
    """Sort and coalesce [start, end) ranges, dropping empty ones."""
    out: Intervals = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def align_out(ranges: Iterable[tuple[int, int]], size: int, block: int = BLOCK) -> Intervals:
    """Widen ranges to whole blocks, clamped to the disk size."""
    return normalize(((s // block) * block, min(size, -(-e // block) * block)) for s, e in ranges)


def union(a: Intervals, b: Intervals) -> Intervals:
    return normalize([*a, *b])


def subtract(a: Intervals, b: Intervals) -> Intervals:
    """a minus b."""
    out: Intervals = []
    j = 0
    for start, end in a:
        cur = start
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < end:
            out.append((cur, end))
    return out


def total(ranges: Intervals) -> int:
    return sum(e - s for s, e in ranges)


def split(ranges: Intervals, unit: int) -> list[tuple[int, int]]:
    """Cut ranges into pieces of at most `unit` bytes, cut on unit boundaries."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        cur = start
        while cur < end:
            nxt = min(end, (cur // unit + 1) * unit)
            out.append((cur, nxt))
            cur = nxt
    return out


def pack(ranges: Intervals) -> bytes:
    """Compact storage for interval lists (little-endian u64 pairs, deflated)."""
    raw = b"".join(s.to_bytes(8, "little") + e.to_bytes(8, "little") for s, e in ranges)
    return zlib.compress(raw, 1)


def unpack(blob: bytes) -> Intervals:
    raw = zlib.decompress(blob)
    return [
        (int.from_bytes(raw[i : i + 8], "little"), int.from_bytes(raw[i + 8 : i + 16], "little"))
        for i in range(0, len(raw), 16)
    ]


@functools.lru_cache(maxsize=64)
def _zero_digest_of(length: int) -> bytes:
    return blake3.blake3(bytes(length)).digest(DIGEST)


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    """Checksum of one block; all-zero blocks (of any length) get ZERO_DIGEST.

    Zero blocks are recognised by their BLAKE3 digest, so no block is copied or compared.
    """
    digest = blake3.blake3(data).digest(DIGEST)
    return ZERO_DIGEST if digest == _zero_digest_of(len(data)) else digest


class Manifest:
    """Per-block checksums of one disk: what every block of a replica holds."""

    def __init__(self, size: int, data: bytes | bytearray | None = None) -> None:
        self.size = size
        n = self.blocks_for(size)
        self.data = bytearray(data) if data is not None else bytearray(n * DIGEST)
        self.resize(size)

    @staticmethod
    def blocks_for(size: int) -> int:
        return -(-size // BLOCK)

    def resize(self, size: int) -> None:
        """Grow (new blocks are zero) or cut to `size`."""
        n = self.blocks_for(size) * DIGEST
        if len(self.data) < n:
            self.data.extend(bytes(n - len(self.data)))
        else:
            del self.data[n:]
        self.size = size

    def get(self, index: int) -> bytes:
        return bytes(self.data[index * DIGEST : (index + 1) * DIGEST])

    def set(self, index: int, digest: bytes) -> None:
        self.data[index * DIGEST : (index + 1) * DIGEST] = digest

    def invalidate(self, ranges: Intervals) -> None:
        """Mark blocks whose replica content is unknown (never equal to any digest)."""
        for start, end in ranges:
            for i in range(start // BLOCK, -(-end // BLOCK)):
                self.set(i, UNKNOWN_DIGEST)

    def has_unknown(self) -> bool:
        """Whether any block's content at the replica is unknown (never true of a point)."""
        pos = self.data.find(UNKNOWN_DIGEST)
        while pos != -1:
            if pos % DIGEST == 0:
                return True
            pos = self.data.find(UNKNOWN_DIGEST, pos + 1)
        return False

    def nonzero(self) -> Intervals:
        """Byte ranges of blocks that are not known to be zero."""
        out: list[tuple[int, int]] = []
        mv = memoryview(self.data)
        for i in range(len(self.data) // DIGEST):
            if mv[i * DIGEST : (i + 1) * DIGEST] != ZERO_DIGEST:
                out.append((i * BLOCK, min(self.size, (i + 1) * BLOCK)))
        return normalize(out)

    def digest(self) -> str:
        return blake3.blake3(bytes(self.data)).hexdigest()

    def to_blob(self) -> bytes:
        return zlib.compress(bytes(self.data), 1)

    @classmethod
    def from_blob(cls, size: int, blob: bytes) -> Manifest:
        return cls(size, zlib.decompress(blob))
