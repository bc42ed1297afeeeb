"""The EBS direct APIs by AWS's documented rules: 512 KiB blocks, SHA-256 per block, paging.

Every block read is checked against the SHA-256 the service sends with it; every block put
carries its SHA-256 (the service refuses a damaged body), and a snapshot is completed with the
count of blocks put and their LINEAR aggregate checksum (the SHA-256 of the blocks' digests in
index order), so the service refuses a snapshot that lost or changed a block.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterable, Mapping
from typing import Any

from standby.core.errors import PluginError, TransientError
from standby.providers.aws.conn import call, paged

BLOCK = 512 * 1024
GiB = 1 << 30
MAX_DIRECT = 16 << 40
"""Largest volume standby reads or writes through the EBS direct APIs (16 TiB)."""
PAGE = 10000


def gib(size: int) -> int:
    """A volume size in whole GiB (at least 1) for `size` bytes."""
    return max(1, -(-size // GiB))


def b64sha(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def list_blocks(ebs: Any, snap_id: str) -> dict[int, str]:
    """Block index -> block token of every block a completed snapshot holds."""
    out: dict[int, str] = {}
    for item in paged(
        f"list blocks of snapshot {snap_id}",
        ebs.list_snapshot_blocks,
        "Blocks",
        SnapshotId=snap_id,
        MaxResults=PAGE,
    ):
        out[int(item["BlockIndex"])] = str(item["BlockToken"])
    return out


def changed_blocks(ebs: Any, first: str, second: str) -> dict[int, str | None]:
    """Blocks that differ between two snapshots of one volume: index -> the second
    snapshot's token (None: the block is not in the second snapshot; it reads as zeroes)."""
    out: dict[int, str | None] = {}
    for item in paged(
        f"changed blocks {first} -> {second}",
        ebs.list_changed_blocks,
        "ChangedBlocks",
        FirstSnapshotId=first,
        SecondSnapshotId=second,
        MaxResults=PAGE,
    ):
        token = item.get("SecondBlockToken")
        out[int(item["BlockIndex"])] = str(token) if token else None
    return out


def check_block_size(answer: Mapping[str, Any], what: str) -> None:
    """The service must say 512 KiB blocks; anything else is refused, never guessed at."""
    size = answer.get("BlockSize")
    if size is not None and int(size) != BLOCK:
        raise PluginError(f"{what}: the service reports {size}-byte blocks; EBS uses {BLOCK}")


def get_block(ebs: Any, snap_id: str, idx: int, token: str) -> bytes:
    """One block, its SHA-256 checked against the service's (a mismatch is retried)."""
    what = f"read block {idx} of snapshot {snap_id}"
    got = call(what, ebs.get_snapshot_block, SnapshotId=snap_id, BlockIndex=idx, BlockToken=token)
    body = got["BlockData"]
    try:
        data: bytes = call(what, body.read)
    finally:
        body.close()
    if len(data) != BLOCK:
        raise TransientError(f"{what}: {len(data)} bytes, not {BLOCK}")
    if got.get("ChecksumAlgorithm") == "SHA256" and got.get("Checksum") != b64sha(data):
        raise TransientError(f"{what}: SHA-256 does not match the service's checksum")
    return data


def put_block(ebs: Any, snap_id: str, idx: int, data: bytes | bytearray | memoryview) -> bytes:
    """Put one whole 512 KiB block with its SHA-256; returns the digest."""
    if len(data) != BLOCK:
        raise PluginError(f"block {idx}: {len(data)} bytes; EBS takes whole {BLOCK}-byte blocks")
    digest = hashlib.sha256(data).digest()
    call(
        f"write block {idx} of snapshot {snap_id}",
        ebs.put_snapshot_block,
        SnapshotId=snap_id,
        BlockIndex=idx,
        BlockData=bytes(data),
        DataLength=BLOCK,
        Checksum=base64.b64encode(digest).decode(),
        ChecksumAlgorithm="SHA256",
    )
    return digest


def start(
    ebs: Any, size: int, parent: str | None, tags: Mapping[str, str], description: str
) -> str:
    """Start a pending snapshot of `size` bytes on top of `parent` (its blocks inherited)."""
    args: dict[str, Any] = {
        "VolumeSize": gib(size),
        "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
        "Description": description[:255],
        "Timeout": 4320,
    }
    if parent:
        args["ParentSnapshotId"] = parent
    got = call("start snapshot", ebs.start_snapshot, **args)
    check_block_size(got, "start snapshot")
    return str(got["SnapshotId"])


def linear_checksum(digests: Mapping[int, bytes]) -> str:
    """AWS's LINEAR aggregate: SHA-256 over the blocks' digests in block-index order."""
    return b64sha(b"".join(digests[i] for i in sorted(digests)))


def complete(ebs: Any, snap_id: str, digests: Mapping[int, bytes]) -> None:
    """Complete a pending snapshot; the service checks the count and the aggregate."""
    args: dict[str, Any] = {"SnapshotId": snap_id, "ChangedBlocksCount": len(digests)}
    if digests:
        args.update(
            Checksum=linear_checksum(digests),
            ChecksumAlgorithm="SHA256",
            ChecksumAggregationMethod="LINEAR",
        )
    call(f"complete snapshot {snap_id}", ebs.complete_snapshot, **args)


def wait_completed(ec2: Any, snap_ids: Iterable[str], timeout: float, poll: float) -> None:
    """Wait until every snapshot is `completed` (an `error` state is a failure)."""
    pending = sorted(set(snap_ids))
    deadline = time.monotonic() + timeout
    delay = min(0.05, poll)
    while pending:
        found = call("describe snapshots", ec2.describe_snapshots, SnapshotIds=pending).get(
            "Snapshots", []
        )
        states = {str(s["SnapshotId"]): str(s.get("State")) for s in found}
        failed = [s for s, st in states.items() if st == "error"]
        if failed:
            raise PluginError(f"snapshot(s) {', '.join(failed)} failed (state 'error')")
        pending = [s for s in pending if states.get(s) != "completed"]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TransientError(f"snapshot(s) {', '.join(pending)} not completed in {timeout}s")
        time.sleep(delay)
        delay = min(delay * 2, poll)
