"""Flat VMDKs as ESXi runs them: a raw `-flat.vmdk` extent and a small text descriptor.

The descriptor format is VMware's (Virtual Disk Format 1.1): `createType="vmfs"` and one
`RW <sectors> VMFS "<name>-flat.vmdk"` extent; ESXi opens it as is on VMFS and NFS
datastores, and qemu-img reads it too. standby writes the extent itself (qemu-img convert to
raw, holes kept) and the descriptor beside it.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

SECTOR = 512
_EXTENT = re.compile(r'^\s*RW\s+(\d+)\s+(?:VMFS|FLAT)\s+"([^"]+)"', re.MULTILINE)


def flat_name(descriptor: str) -> str:
    """`disk.vmdk` -> `disk-flat.vmdk` (the convention vSphere follows)."""
    return (
        descriptor[: -len(".vmdk")] + "-flat.vmdk" if descriptor.endswith(".vmdk") else descriptor
    )


def descriptor(flat: str, size: int, adapter: str = "lsilogic") -> str:
    """The descriptor of a flat disk of `size` bytes (a multiple of 512) in file `flat`."""
    sectors = size // SECTOR
    cylinders = max(1, min(sectors // (255 * 63), 65535))
    return (
        '# Disk DescriptorFile\nversion=1\nencoding="UTF-8"\n'
        f'CID={secrets.randbits(32):08x}\nparentCID=ffffffff\ncreateType="vmfs"\n\n'
        f'# Extent description\nRW {sectors} VMFS "{flat}"\n\n'
        "# The Disk Data Base\n#DDB\n\n"
        f'ddb.adapterType = "{adapter}"\nddb.geometry.cylinders = "{cylinders}"\n'
        'ddb.geometry.heads = "255"\nddb.geometry.sectors = "63"\n'
        'ddb.virtualHWVersion = "13"\nddb.thinProvisioned = "1"\n'
    )


def write_descriptor(path: Path, size: int, adapter: str = "lsilogic") -> None:
    """Write `path` (the `.vmdk`) for the flat extent beside it, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(descriptor(flat_name(path.name), size, adapter))
    os.replace(tmp, path)


def extent_file(path: Path) -> tuple[Path, int] | None:
    """The flat extent a descriptor names and its size, or None when it is not a one-extent
    flat disk (sparse, delta or several extents: not something standby seeds from)."""
    try:
        text = path.read_text(errors="replace")[:65536]
    except OSError:
        return None
    if "parentFileNameHint" in text:
        return None
    found = _EXTENT.findall(text)
    if len(found) != 1:
        return None
    sectors, name = found[0]
    return path.parent / name, int(sectors) * SECTOR
