"""The allocation map of one qcow2 file, read from its own L1/L2 tables (not its backing chain).

Which clusters a replica overlay holds is the target's proof of a cycle's writes. QEMU can
report it over NBD (`qemu:allocation-depth`), but that walks the whole backing chain, which
grows with every retained point (94-171 ms for a 4 GiB disk with a few points, measured);
reading the overlay's tables costs a few small preads. Call it after the writer flushed:
QEMU writes its metadata caches into the file on every flush.

Format facts (QEMU's docs/interop/qcow2.txt): big-endian header with the cluster size
(`1 << cluster_bits`), virtual size, and the L1 table's offset and size; L1 entries point to
L2 tables of cluster_size / 8 entries; bits 9-55 of an entry are the host offset, bit 62
marks a compressed cluster, and in an L2 entry bit 0 marks a cluster that reads as zeroes.
An L2 entry that is non-zero (data or the zero flag) is allocated in this file: it hides
whatever the backing file holds there.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from standby.core.errors import PluginError
from standby.core.extents import Intervals, normalize

OFFSET_MASK = 0x00FFFFFFFFFFFE00
EXTENDED_L2 = 1 << 4  # incompatible feature bit


def allocated(path: Path) -> Intervals:
    """Byte ranges whose content this qcow2 file itself holds (data or zero clusters)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, 104, 0)
        if len(head) < 72 or head[:4] != b"QFI\xfb":
            raise PluginError(f"{path} is not a qcow2 image")
        version, cluster_bits, size, l1_size, l1_offset = _header(head)
        if version >= 3 and struct.unpack(">Q", head[72:80])[0] & EXTENDED_L2:
            raise PluginError(f"{path}: qcow2 extended L2 entries are not supported")
        cluster = 1 << cluster_bits
        per_l2 = cluster // 8
        l1 = struct.unpack(f">{l1_size}Q", os.pread(fd, l1_size * 8, l1_offset))
        out: list[tuple[int, int]] = []
        for i, l1_entry in enumerate(l1):
            l2_offset = l1_entry & OFFSET_MASK
            if not l2_offset:
                continue
            l2 = struct.unpack(f">{per_l2}Q", os.pread(fd, cluster, l2_offset))
            base = i * per_l2 * cluster
            for j, entry in enumerate(l2):
                if entry:
                    start = base + j * cluster
                    if start < size:
                        out.append((start, min(size, start + cluster)))
        return normalize(out)
    finally:
        os.close(fd)


def _header(head: bytes) -> tuple[int, int, int, int, int]:
    """version, cluster_bits, virtual size, L1 entries, L1 offset."""
    version = struct.unpack(">I", head[4:8])[0]
    cluster_bits = struct.unpack(">I", head[20:24])[0]
    size = struct.unpack(">Q", head[24:32])[0]
    l1_size = struct.unpack(">I", head[36:40])[0]
    l1_offset = struct.unpack(">Q", head[40:48])[0]
    return version, cluster_bits, size, l1_size, l1_offset
