"""Replica disks as page blobs (fixed VHD) and recovery points as blob snapshots.

Layout in the site's container, per protection (`p<id>-<vm>/`):

- `<disk>.vhd`: the live replica, a page blob of `blob_size(disk)` bytes ending with a VHD
  footer. Cycles write here; it is never exposed as a point by itself.
- snapshots of each `<disk>.vhd`, with metadata `standby_point=<cycle id>`: the points;
- `points/<cycle id>.json`: the point's manifest (written last: a point without it is not a
  point).

Azure's limits are enforced here because Azurite does not: Put Page takes at most 4 MiB and
512-byte aligned ranges; a page blob is at most 8 TiB.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from standby.core.errors import PluginError, TransientError
from standby.core.extents import Intervals
from standby.core.interfaces import Buffer, ReplicaWriter
from standby.core.model import DiskSpec, Extent, ProtectionInfo
from standby.core.vault.seal import MetaSealer, open_meta
from standby.providers.azure import vhd
from standby.providers.azure.conn import azure_errors

PAGE = 512
MAX_PUT_PAGE = 4 << 20
MAX_PAGE_BLOB = 8 << 40
MAX_DISK = MAX_PAGE_BLOB - vhd.MiB
"""Largest source disk: its MiB-rounded size plus the footer must fit a page blob."""
POINT_KEY = "standby_point"


def prefix(protection: ProtectionInfo) -> str:
    """The blob-name folder of a protection."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "-", protection.vm.name)[:60]
    return f"p{protection.id}-{slug}"


def disk_blob(protection: ProtectionInfo, disk: str) -> str:
    return f"{prefix(protection)}/{disk}.vhd"


def manifest_blob(protection: ProtectionInfo, point_id: int) -> str:
    return f"{prefix(protection)}/points/{point_id}.json"


def check_range(offset: int, length: int, size: int, what: str) -> None:
    """Azure's Put Page rules: 512-byte aligned, inside the blob."""
    if offset % PAGE or length % PAGE:
        raise PluginError(f"{what}: range {offset}+{length} is not 512-byte aligned")
    if offset < 0 or offset + length > size:
        raise PluginError(f"{what}: range {offset}+{length} is outside the disk ({size} bytes)")


def read_range(client: Any, extent: Extent, what: str) -> bytes:
    """One ranged Get Blob (of the client's snapshot, if it names one).

    `download_blob` follows every page-blob read with a Get Page Ranges of the WHOLE blob (to
    skip holes in large downloads); for 4 MiB reads that doubles the requests and costs more
    than the read. The SDK's generated operation does just the ranged GET; `download_blob`
    remains the fallback should that layer move.
    """
    end = extent.offset + extent.length - 1
    generated = getattr(getattr(client, "_client", None), "blob", None)
    with azure_errors(what):
        if generated is not None and hasattr(generated, "download"):
            data = b"".join(
                generated.download(snapshot=client.snapshot, range=f"bytes={extent.offset}-{end}")
            )
        else:
            data = client.download_blob(
                offset=extent.offset, length=extent.length, max_concurrency=1
            ).readall()
    if len(data) != extent.length:
        raise TransientError(f"{what}: {len(data)} of {extent.length} bytes at {extent.offset}")
    return bytes(data)


class PageBlobDisk:
    """One replica disk: its base page blob and the VHD layout around it."""

    def __init__(self, container: Any, name: str, spec: DiskSpec) -> None:
        self.container = container
        self.name = name
        self.spec = spec
        self.client = container.get_blob_client(name)
        self.vsize = vhd.virtual_size(spec.size)

    def exists(self) -> bool:
        with azure_errors(f"replica blob {self.name}"):
            return bool(self.client.exists())

    def ensure(self) -> None:
        """Create the blob, grow it to the disk's size, and make sure its footer is valid."""
        from azure.core.exceptions import ResourceNotFoundError

        want = vhd.blob_size(self.spec.size)
        if want > MAX_PAGE_BLOB:
            raise PluginError(f"disk '{self.spec.name}' needs a {want}-byte page blob (max 8 TiB)")
        with azure_errors(f"replica blob {self.name}"):
            try:
                size = int(self.client.get_blob_properties().size)
            except ResourceNotFoundError:
                self.client.create_page_blob(want, metadata={"standby_disk": self.spec.name})
                self._write_footer(vhd.new_footer(self.spec.size))
                return
            if size > want:
                raise PluginError(
                    f"replica blob {self.name} is {size} bytes, larger than the disk needs ({want})"
                )
            old = self._footer(size)
            if size < want:
                self.client.resize_blob(want)
                # the old footer now lies inside the disk: it must read as zeroes there
                self.client.clear_page(offset=size - vhd.FOOTER, length=vhd.FOOTER)
                uid = old.unique_id if old else vhd.new_footer(self.spec.size).unique_id
                self._write_footer(vhd.Footer(self.vsize, uid, vhd.new_footer(0).timestamp))
            elif old is None or old.size != self.vsize:
                self._write_footer(vhd.new_footer(self.spec.size))

    def _footer(self, size: int) -> vhd.Footer | None:
        raw = self.client.download_blob(offset=size - vhd.FOOTER, length=vhd.FOOTER).readall()
        try:
            return vhd.parse_footer(raw)
        except PluginError:
            return None

    def _write_footer(self, footer: vhd.Footer) -> None:
        self.client.upload_page(footer.pack(), offset=self.vsize, length=vhd.FOOTER)

    def write(self, offset: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        if len(view) % PAGE and offset + len(view) >= self.spec.size:
            view = memoryview(bytes(view) + bytes(PAGE - len(view) % PAGE))  # the disk's tail
        check_range(offset, len(view), self.vsize, f"write to {self.name}")
        with azure_errors(f"write to replica blob {self.name}"):
            for start in range(0, len(view), MAX_PUT_PAGE):
                piece = view[start : start + MAX_PUT_PAGE]
                # The service checks the body against this MD5 and rejects a damaged write.
                md5 = hashlib.md5(piece, usedforsecurity=False).digest()
                self.client.upload_page(
                    piece, offset=offset + start, length=len(piece), transactional_content_md5=md5
                )

    def zero(self, extent: Extent) -> None:
        length = -(-extent.length // PAGE) * PAGE
        check_range(extent.offset, length, self.vsize, f"clear in {self.name}")
        with azure_errors(f"clear pages of replica blob {self.name}"):
            self.client.clear_page(offset=extent.offset, length=length)

    def read(self, extent: Extent, snapshot: str | None = None) -> bytes:
        """One ranged Get Blob of the base blob or one of its snapshots."""
        client = self.client
        if snapshot:
            client = self.container.get_blob_client(self.name, snapshot=snapshot)
        return read_range(client, extent, f"read replica blob {self.name}")

    def snapshots(self) -> dict[int, str]:
        """Point id -> snapshot time of this blob's snapshots made by standby."""
        found: dict[int, str] = {}
        with azure_errors(f"list snapshots of {self.name}"):
            for item in self.container.list_blobs(
                name_starts_with=self.name, include=["snapshots", "metadata"]
            ):
                if item.name == self.name and item.snapshot and item.metadata:
                    key = item.metadata.get(POINT_KEY)
                    if key and key.isdigit():
                        found[int(key)] = item.snapshot
        return found

    def snapshot(self, point_id: int) -> str:
        """Snapshot the base blob for a point (reusing one an interrupted commit made)."""
        existing = self.snapshots().get(point_id)
        if existing:
            return existing
        with azure_errors(f"snapshot replica blob {self.name}"):
            made = self.client.create_snapshot(metadata={POINT_KEY: str(point_id)})
        return str(made["snapshot"])

    def restore(self, snapshot: str | None, timeout: float = 3600) -> None:
        """Make the base blob equal to a snapshot again (or all zeroes), footer kept."""
        with azure_errors(f"restore replica blob {self.name}"):
            if snapshot is None:
                self.client.clear_page(offset=0, length=self.vsize)
                return
            self.client.start_copy_from_url(f"{self.client.url}?snapshot={snapshot}")
            deadline = time.monotonic() + timeout
            while True:
                copy = self.client.get_blob_properties().copy
                if copy.status in (None, "success"):
                    return
                if copy.status != "pending":
                    raise PluginError(f"restoring {self.name} failed: {copy.status_description}")
                if time.monotonic() > deadline:
                    raise TransientError(f"restoring {self.name} did not finish in {timeout}s")
                time.sleep(0.5)


class PageBlobWriter(ReplicaWriter):
    """A cycle's writes: straight into the base blobs (points are snapshots of them)."""

    def __init__(self, container: Any, protection: ProtectionInfo, cycle_id: int,
                 sealer: MetaSealer | None = None) -> None:  # fmt: skip
        self.container = container
        self.sealer = sealer
        self.protection = protection
        self.cycle_id = cycle_id
        self.disks = {
            d.name: PageBlobDisk(container, disk_blob(protection, d.name), d)
            for d in protection.vm.disks
        }
        self._lock = threading.Lock()

    def open(self) -> PageBlobWriter:
        for disk in self.disks.values():
            disk.ensure()
        return self

    def _disk(self, name: str) -> PageBlobDisk:
        try:
            return self.disks[name]
        except KeyError:
            raise PluginError(f"VM '{self.protection.vm.name}' has no disk '{name}'") from None

    def write(self, disk: str, offset: int, data: Buffer) -> None:
        self._disk(disk).write(offset, data)

    def write_zeroes(self, disk: str, extent: Extent) -> None:
        self._disk(disk).zero(extent)

    def read(self, disk: str, extent: Extent) -> bytes:
        return self._disk(disk).read(extent)

    def flush(self) -> None:
        """Put Page is durable when it returns: nothing to do."""

    def unproven(self, disk: str, written: Intervals, planned: Intervals) -> Intervals:
        """Every Put Page carried the MD5 of its body, which the service checked before it
        stored the page (Clear Pages carry no data): nothing is left unproven."""
        return []

    def commit_point(self, point_id: int, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        existing = read_manifest(self.container, self.protection, point_id, self.sealer)
        if existing is not None:
            return point_ref(existing)
        snaps = {name: d.snapshot(point_id) for name, d in self.disks.items()}
        manifest = {
            "format": "standby-azure-point/1",
            "point": point_id,
            "protection": self.protection.id,
            "vm": self.protection.vm.name,
            "sealed_at": datetime.now(UTC).isoformat(),
            "meta": dict(meta or {}),
            "disks": {
                name: {
                    "blob": d.name,
                    "snapshot": snaps[name],
                    "size": d.spec.size,
                    "vhd_size": d.vsize,
                    "boot": d.spec.boot,
                }
                for name, d in self.disks.items()
            },
        }
        name = manifest_blob(self.protection, point_id)
        body = (
            self.sealer.seal_json("azure-point", name, manifest)
            if self.sealer
            else json.dumps(manifest, indent=1).encode()
        )
        with azure_errors(f"write point manifest {name}"):
            self.container.upload_blob(name, body, overwrite=True)
        return point_ref(manifest)


def point_ref(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The ref the engine keeps for a point: its snapshots and its manifest's name."""
    return {
        "point": manifest["point"],
        "snapshots": {name: d["snapshot"] for name, d in manifest["disks"].items()},
        "blobs": {name: d["blob"] for name, d in manifest["disks"].items()},
    }


def read_manifest(
    container: Any, protection: ProtectionInfo, point_id: int, sealer: MetaSealer | None = None
) -> Any:
    """A point's manifest, or None when the point was never sealed; sealed with a vault's key
    when the site names one (IntegrityError naming the blob when it was changed)."""
    from azure.core.exceptions import ResourceNotFoundError

    name = manifest_blob(protection, point_id)
    with azure_errors(f"read point manifest {name}"):
        try:
            blob = container.download_blob(name).readall()
        except ResourceNotFoundError:
            return None
    return open_meta(sealer, "azure-point", name, blob, f"point manifest {name}")
