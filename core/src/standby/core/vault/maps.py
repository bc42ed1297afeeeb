"""A disk's map in a vault point: which chunk holds which bytes.

The disk is cut into slots of the vault's chunk size; each slot holds pieces `(start, end,
chunk id, skip)`: bytes start..end of the disk are bytes skip..skip+(end-start) of the chunk.
A full aligned slot written at once is one whole chunk (what deduplicates across VMs); a
smaller write is a chunk of just those bytes, so an incremental cycle stores what changed
and never rewrites the chunk around it. Bytes no piece covers read as zeroes.
"""

from __future__ import annotations

import builtins
import struct
from collections.abc import Iterator

Piece = tuple[int, int, bytes, int]
_REC = struct.Struct("<QII32s")  # start, length, skip, chunk id


class DiskMap:
    """The pieces of one disk, by slot."""

    def __init__(self, size: int, chunk: int) -> None:
        self.size, self.chunk = size, chunk
        self.slots: dict[int, list[Piece]] = {}

    def copy(self) -> DiskMap:
        out = DiskMap(self.size, self.chunk)
        out.slots = {k: list(v) for k, v in self.slots.items()}
        return out

    def _cut(self, slot: int, start: int, end: int) -> list[Piece]:
        """The slot's pieces with start..end taken out."""
        kept: list[Piece] = []
        for s, e, cid, skip in self.slots.get(slot, ()):
            if e <= start or s >= end:
                kept.append((s, e, cid, skip))
                continue
            if s < start:
                kept.append((s, start, cid, skip))
            if e > end:
                kept.append((end, e, cid, skip + end - s))
        return kept

    def set(self, start: int, end: int, cid: bytes, skip: int = 0) -> None:
        """Bytes start..end (within one slot) are now chunk `cid` from `skip`."""
        slot = start // self.chunk
        pieces = self._cut(slot, start, end)
        pieces.append((start, end, cid, skip))
        pieces.sort()
        self.slots[slot] = pieces

    def clear(self, start: int, end: int) -> None:
        """Bytes start..end read as zeroes."""
        for slot in range(start // self.chunk, -(-end // self.chunk)):
            if slot in self.slots:
                pieces = self._cut(slot, start, end)
                if pieces:
                    self.slots[slot] = pieces
                else:
                    del self.slots[slot]

    def resize(self, size: int) -> None:
        if size < self.size:
            self.clear(size, self.size)
        self.size = size

    def pieces(self, start: int, end: int) -> Iterator[Piece]:
        """The pieces over start..end, clipped to it, in order."""
        for slot in range(start // self.chunk, -(-end // self.chunk)):
            for s, e, cid, skip in self.slots.get(slot, ()):
                if e <= start or s >= end:
                    continue
                lo, hi = max(s, start), min(e, end)
                yield lo, hi, cid, skip + lo - s

    def all_pieces(self) -> Iterator[Piece]:
        for slot in sorted(self.slots):
            yield from self.slots[slot]

    def chunk_ids(self) -> builtins.set[bytes]:
        return {p[2] for pieces in self.slots.values() for p in pieces}

    def mapped_bytes(self) -> int:
        return sum(e - s for pieces in self.slots.values() for s, e, _c, _k in pieces)

    def to_bytes(self) -> bytes:
        return b"".join(_REC.pack(s, e - s, skip, cid) for s, e, cid, skip in self.all_pieces())

    @classmethod
    def from_bytes(cls, size: int, chunk: int, blob: bytes) -> DiskMap:
        out = cls(size, chunk)
        for s, n, skip, cid in _REC.iter_unpack(blob):
            out.slots.setdefault(s // chunk, []).append((s, s + n, cid, skip))
        return out
