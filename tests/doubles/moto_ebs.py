"""The AWS double: moto's server behind a shim that does what moto does not.

moto keeps EC2 (instances, volumes, snapshots, images, VPCs) and is reached by the real boto3
client. Its EBS direct API is wrong where standby depends on it (test-doubles.md): blocks of
512 bytes, ParentSnapshotId ignored, no checksum checks, `list_changed_blocks` wrong, no
pagination, and no data in volumes or in EC2-made snapshots at all. So this shim:

- answers the EBS direct API itself, by AWS's documented rules: 512 KiB blocks, SHA-256 per
  block checked, the LINEAR aggregate checksum and the changed-blocks count checked at
  completion, a child snapshot inheriting its parent's blocks, paged listings, block tokens
  checked on reads, a pending snapshot unreadable;
- gives moto's volumes and snapshots data: an EC2 snapshot copies its volume's blocks, a
  volume made from a snapshot (also through run_instances) starts with them;
- refuses unknown access keys (AuthFailure / UnrecognizedClientException), injects errors
  on request (`RequestLimitExceeded`, `RequestThrottledException`...), counts calls;
- control endpoints under `/_standby/` for tests: write into a volume as its guest would,
  read a volume's or snapshot's image, inject faults, read the counters.

Blocks are stored once each, by SHA-256, in files under the data directory (bounded memory).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

BLOCK = 512 * 1024
GiB = 1 << 30
ACCOUNT = "123456789012"
ZERO_SHA = hashlib.sha256(bytes(BLOCK)).hexdigest()
_CRED = re.compile(r"Credential=([^/,\s]+)/[^/]+/([^/]+)/([^/]+)/")
StartResponse = Callable[..., Any]


class ShimError(Exception):
    """An AWS error answer: the code, the HTTP status, the message."""

    def __init__(self, code: str, status: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code, self.status, self.message, self.reason = code, status, message, reason


@dataclass
class SnapData:
    """One snapshot's blocks (index -> sha256 hex) and, while pending, what was put."""

    volume_size: int
    status: str = "completed"
    blocks: dict[int, str] = field(default_factory=dict)
    puts: dict[int, bytes] = field(default_factory=dict)
    parent: str | None = None


class BlockStore:
    """Block bytes by content, and the block maps of snapshots and volumes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.snaps: dict[str, SnapData] = {}
        self.volumes: dict[str, dict[int, str]] = {}
        self.put(bytes(BLOCK))

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.root / sha
        if not path.exists():
            tmp = self.root / f".{sha}.{uuid.uuid4().hex}"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha

    def get(self, sha: str | None) -> bytes:
        if sha is None or sha == ZERO_SHA:
            return bytes(BLOCK)
        return (self.root / sha).read_bytes()

    def write_volume(self, vol: str, offset: int, data: bytes) -> None:
        """A guest write: read-modify-write of the 512 KiB blocks it touches."""
        with self.lock:
            blocks = self.volumes.setdefault(vol, {})
            pos = 0
            while pos < len(data):
                idx, within = divmod(offset + pos, BLOCK)
                n = min(BLOCK - within, len(data) - pos)
                if n == BLOCK:
                    new = data[pos : pos + n]
                else:
                    old = bytearray(self.get(blocks.get(idx)))
                    old[within : within + n] = data[pos : pos + n]
                    new = bytes(old)
                sha = self.put(new)
                if sha == ZERO_SHA:
                    blocks.pop(idx, None)
                else:
                    blocks[idx] = sha
                pos += n

    def image(self, blocks: dict[int, str], offset: int, length: int) -> Iterator[bytes]:
        """The bytes of [offset, offset+length) of a block map."""
        end = offset + length
        pos = offset
        while pos < end:
            idx, within = divmod(pos, BLOCK)
            n = min(BLOCK - within, end - pos)
            yield self.get(blocks.get(idx))[within : within + n]
            pos += n


def token_for(snap: str, idx: int, sha: str) -> str:
    raw = f"{snap}/{idx}/{sha[:16]}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _page(items: list[int], query: dict[str, str], default: int = 10000) -> tuple[list[int], str]:
    """One page of sorted block indexes (maxResults 100..10000, pageToken, startingBlockIndex)."""
    try:
        size = int(query.get("maxResults", default))
        start = int(query.get("startingBlockIndex", 0))
        after = int(base64.b64decode(query["pageToken"]).decode()) if "pageToken" in query else -1
    except (ValueError, KeyError) as exc:
        raise ShimError("ValidationException", 400, f"bad paging parameter: {exc}") from None
    if not 100 <= size <= 10000:
        raise ShimError("ValidationException", 400, "maxResults must be in 100..10000")
    chosen = [i for i in items if i >= start and i > after]
    page = chosen[:size]
    more = len(chosen) > size
    return page, base64.b64encode(str(page[-1]).encode()).decode() if more else ""


class Faults:
    """Errors to answer instead of the next N calls of an action."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[str, list[list[Any]]] = {}
        self.calls: dict[str, int] = {}
        self.injected: dict[str, int] = {}

    def add(self, action: str, code: str, count: int, status: int) -> None:
        with self.lock:
            self.pending.setdefault(action, []).append([code, count, status])

    def hit(self, action: str) -> ShimError | None:
        with self.lock:
            self.calls[action] = self.calls.get(action, 0) + 1
            queue = self.pending.get(action) or self.pending.get("*")
            if not queue:
                return None
            entry = queue[0]
            entry[1] -= 1
            if entry[1] <= 0:
                queue.pop(0)
            self.injected[entry[0]] = self.injected.get(entry[0], 0) + 1
            return ShimError(entry[0], entry[2], f"{entry[0]}: injected by the test double")


class Shim:
    """The WSGI application in front of moto's."""

    def __init__(self, moto_app: Any, store: BlockStore, keys: Iterable[str] = ()) -> None:
        self.moto_app = moto_app
        self.store = store
        self.keys = set(keys)
        self.faults = Faults()

    # ------------------------------------------------------------ dispatch

    def __call__(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_standby/"):
            return self._control(environ, start)
        match = _CRED.search(environ.get("HTTP_AUTHORIZATION", ""))
        akid, region, service = match.groups() if match else ("", "us-east-1", "")
        if service == "ebs":
            return self._ebs(environ, start, akid, region)
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = BytesIO(body)
        if self.keys and akid not in self.keys:
            return self._ec2_error(
                start,
                ShimError(
                    "AuthFailure",
                    401,
                    "AWS was not able to validate the provided access credentials",
                ),
            )
        if service == "ec2":
            action = (parse_qs(body.decode()).get("Action") or [""])[0]
            fault = self.faults.hit(action)
            if fault is not None:
                return self._ec2_error(start, fault)
        result: Iterable[bytes] = self.moto_app(environ, start)
        return result

    @staticmethod
    def _ec2_error(start: StartResponse, err: ShimError) -> list[bytes]:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
            f"<Code>{err.code}</Code><Message>{err.message}</Message></Error></Errors>"
            f"<RequestID>{uuid.uuid4()}</RequestID></Response>"
        ).encode()
        start(
            f"{err.status} Error",
            [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))],
        )
        return [body]

    @staticmethod
    def _json(start: StartResponse, status: int, doc: Any, headers: Any = ()) -> list[bytes]:
        body = json.dumps(doc).encode()
        start(
            f"{status} OK",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers],
        )
        return [body]

    def _ebs(
        self, environ: dict[str, Any], start: StartResponse, akid: str, region: str
    ) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        try:
            if self.keys and akid not in self.keys:
                raise ShimError(
                    "UnrecognizedClientException",
                    403,
                    "The security token included in the request is invalid",
                )
            route = self._route(method, path)
            if route is None:
                raise ShimError("ValidationException", 400, f"no EBS operation {method} {path}")
            action, args = route
            fault = self.faults.hit(action)
            if fault is not None:
                raise fault
            handler = getattr(self, f"_op_{action}")
            with self.store.lock:
                result: Iterable[bytes] = handler(environ, start, query, region, *args)
            return result
        except ShimError as err:
            environ["wsgi.input"].read()  # the body unread, the server would drop the connection
            doc = {"Message": err.message, "message": err.message}
            if err.reason:
                doc["Reason"] = err.reason
            return self._json(start, err.status, doc, [("x-amzn-ErrorType", err.code)])

    @staticmethod
    def _route(method: str, path: str) -> tuple[str, tuple[str, ...]] | None:
        parts = [p for p in path.split("/") if p]
        if parts[:1] != ["snapshots"]:
            return None
        if method == "POST" and len(parts) == 1:
            return "StartSnapshot", ()
        if method == "POST" and len(parts) == 3 and parts[1] == "completion":
            return "CompleteSnapshot", (parts[2],)
        if method == "GET" and len(parts) == 3 and parts[2] == "blocks":
            return "ListSnapshotBlocks", (parts[1],)
        if method == "GET" and len(parts) == 3 and parts[2] == "changedblocks":
            return "ListChangedBlocks", (parts[1],)
        if len(parts) == 4 and parts[2] == "blocks":
            return ("PutSnapshotBlock" if method == "PUT" else "GetSnapshotBlock"), (
                parts[1],
                parts[3],
            )
        return None

    # ------------------------------------------------------------ EBS direct operations

    def _snap(self, snap_id: str) -> SnapData:
        snap = self.store.snaps.get(snap_id)
        if snap is None:
            raise ShimError(
                "ResourceNotFoundException", 404, f"The snapshot '{snap_id}' does not exist."
            )
        return snap

    def _completed(self, snap_id: str) -> SnapData:
        snap = self._snap(snap_id)
        if snap.status != "completed":
            raise ShimError(
                "ValidationException",
                400,
                f"The snapshot '{snap_id}' is not completed.",
                "INVALID_SNAPSHOT",
            )
        return snap

    def _op_StartSnapshot(
        self, environ: dict[str, Any], start: StartResponse, q: dict[str, str], region: str
    ) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        req = json.loads(environ["wsgi.input"].read(length) or b"{}")
        size = int(req.get("VolumeSize", 0))
        if not 1 <= size <= 65536:
            raise ShimError("ValidationException", 400, "VolumeSize must be 1..65536 GiB")
        parent_id = req.get("ParentSnapshotId")
        blocks: dict[int, str] = {}
        if parent_id:
            parent = self._completed(parent_id)
            if size < parent.volume_size:
                raise ShimError(
                    "ValidationException", 400, "VolumeSize is smaller than the parent snapshot's"
                )
            blocks = dict(parent.blocks)
        backend = ec2_backend(region)
        vol = backend.create_volume(size=size, zone_name=f"{region}a")
        snap = backend.create_snapshot(vol.id, description=req.get("Description", ""))
        backend.volumes.pop(vol.id, None)  # the snapshot keeps its size; no volume is left
        self.store.volumes.pop(vol.id, None)
        snap.status = "pending"
        tags = {t["Key"]: t["Value"] for t in req.get("Tags", []) or []}
        if tags:
            snap.add_tags(tags)
        self.store.snaps[snap.id] = SnapData(size, "pending", blocks, {}, parent_id)
        doc = {
            "SnapshotId": snap.id,
            "OwnerId": ACCOUNT,
            "Status": "pending",
            "StartTime": time.time(),
            "VolumeSize": size,
            "BlockSize": BLOCK,
            "Tags": req.get("Tags", []),
            "Description": req.get("Description", ""),
        }
        if parent_id:
            doc["ParentSnapshotId"] = parent_id
        return self._json(start, 201, doc)

    def _op_PutSnapshotBlock(
        self,
        environ: dict[str, Any],
        start: StartResponse,
        q: dict[str, str],
        region: str,
        snap_id: str,
        index: str,
    ) -> list[bytes]:
        snap = self._snap(snap_id)
        if snap.status != "pending":
            raise ShimError(
                "ValidationException",
                400,
                f"The snapshot '{snap_id}' is not pending.",
                "INVALID_SNAPSHOT",
            )
        idx = int(index)
        if not 0 <= idx < snap.volume_size * GiB // BLOCK:
            raise ShimError(
                "ValidationException", 400, f"BlockIndex {idx} is out of range", "INVALID_BLOCK"
            )
        declared = int(environ.get("HTTP_X_AMZ_DATA_LENGTH") or -1)
        data = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        if declared != BLOCK or len(data) != BLOCK:
            raise ShimError(
                "ValidationException",
                400,
                f"DataLength must be {BLOCK} bytes (got {declared}, {len(data)})",
                "INVALID_DATA_LENGTH",
            )
        algo = environ.get("HTTP_X_AMZ_CHECKSUM_ALGORITHM", "")
        checksum = environ.get("HTTP_X_AMZ_CHECKSUM", "")
        if algo != "SHA256" or not checksum:
            raise ShimError(
                "ValidationException", 400, "a SHA256 checksum is required", "INVALID_CHECKSUM"
            )
        digest = hashlib.sha256(data).digest()
        if base64.b64encode(digest).decode() != checksum:
            raise ShimError(
                "ValidationException",
                400,
                "the checksum does not match the data",
                "INVALID_CHECKSUM",
            )
        snap.blocks[idx] = self.store.put(data)
        snap.puts[idx] = digest
        return self._json(
            start, 201, {}, [("x-amz-Checksum", checksum), ("x-amz-Checksum-Algorithm", "SHA256")]
        )

    def _op_CompleteSnapshot(
        self,
        environ: dict[str, Any],
        start: StartResponse,
        q: dict[str, str],
        region: str,
        snap_id: str,
    ) -> list[bytes]:
        snap = self._snap(snap_id)
        if snap.status == "completed":
            return self._json(start, 202, {"Status": "completed"})
        count = int(environ.get("HTTP_X_AMZ_CHANGEDBLOCKSCOUNT") or -1)
        if count != len(snap.puts):
            raise ShimError(
                "ValidationException",
                400,
                f"ChangedBlocksCount {count} but {len(snap.puts)} blocks were put",
            )
        checksum = environ.get("HTTP_X_AMZ_CHECKSUM")
        if checksum:
            method = environ.get("HTTP_X_AMZ_CHECKSUM_AGGREGATION_METHOD", "")
            if method != "LINEAR" or environ.get("HTTP_X_AMZ_CHECKSUM_ALGORITHM") != "SHA256":
                raise ShimError("ValidationException", 400, "aggregation must be LINEAR/SHA256")
            linear = b"".join(snap.puts[i] for i in sorted(snap.puts))
            if _b64sha(linear) != checksum:
                raise ShimError(
                    "ValidationException",
                    400,
                    "the snapshot checksum does not match its blocks",
                    "INVALID_CHECKSUM",
                )
        snap.status = "completed"
        snap.puts = {}
        snap.blocks = {i: s for i, s in snap.blocks.items() if s != ZERO_SHA or snap.parent}
        ec2_snap = ec2_backend(region).snapshots.get(snap_id)
        if ec2_snap is not None:
            ec2_snap.status = "completed"
        return self._json(start, 202, {"Status": "completed"})

    def _op_ListSnapshotBlocks(
        self,
        environ: dict[str, Any],
        start: StartResponse,
        q: dict[str, str],
        region: str,
        snap_id: str,
    ) -> list[bytes]:
        snap = self._completed(snap_id)
        page, nxt = _page(sorted(snap.blocks), q)
        blocks = [{"BlockIndex": i, "BlockToken": token_for(snap_id, i, snap.blocks[i])}
                  for i in page]  # fmt: skip
        return self._listing(start, "Blocks", blocks, snap.volume_size, nxt)

    def _listing(
        self, start: StartResponse, key: str, items: list[Any], volume_size: int, nxt: str
    ) -> list[bytes]:
        """A page of a block listing, as both list operations answer."""
        doc: dict[str, Any] = {
            key: items,
            "ExpiryTime": time.time() + 3600,
            "VolumeSize": volume_size,
            "BlockSize": BLOCK,
        }
        if nxt:
            doc["NextToken"] = nxt
        return self._json(start, 200, doc)

    def _op_ListChangedBlocks(
        self,
        environ: dict[str, Any],
        start: StartResponse,
        q: dict[str, str],
        region: str,
        second_id: str,
    ) -> list[bytes]:
        second = self._completed(second_id)
        first_id = q.get("firstSnapshotId")
        first = self._completed(first_id) if first_id else SnapData(second.volume_size)
        zero = ZERO_SHA
        changed = sorted(
            i
            for i in set(first.blocks) | set(second.blocks)
            if first.blocks.get(i, zero) != second.blocks.get(i, zero)
        )
        page, nxt = _page(changed, q)
        out = []
        for i in page:
            item: dict[str, Any] = {"BlockIndex": i}
            if first_id and i in first.blocks:
                item["FirstBlockToken"] = token_for(first_id, i, first.blocks[i])
            if i in second.blocks:
                item["SecondBlockToken"] = token_for(second_id, i, second.blocks[i])
            out.append(item)
        return self._listing(start, "ChangedBlocks", out, second.volume_size, nxt)

    def _op_GetSnapshotBlock(
        self,
        environ: dict[str, Any],
        start: StartResponse,
        q: dict[str, str],
        region: str,
        snap_id: str,
        index: str,
    ) -> list[bytes]:
        snap = self._completed(snap_id)
        idx = int(index)
        sha = snap.blocks.get(idx)
        if sha is None or q.get("blockToken") != token_for(snap_id, idx, sha):
            raise ShimError(
                "ValidationException", 400, "the block token is not valid", "INVALID_BLOCK_TOKEN"
            )
        data = self.store.get(sha)
        start(
            "200 OK",
            [
                ("Content-Type", "application/octet-stream"),
                ("Content-Length", str(len(data))),
                ("x-amz-Data-Length", str(len(data))),
                ("x-amz-Checksum", _b64sha(data)),
                ("x-amz-Checksum-Algorithm", "SHA256"),
            ],
        )
        return [data]

    # ------------------------------------------------------------ control endpoints

    def _control(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        store = self.store
        if path == "/_standby/write":
            data = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            store.write_volume(q["volume"], int(q.get("offset", 0)), data)
            return self._json(start, 200, {"written": len(data)})
        if path == "/_standby/image":
            offset, length = int(q.get("offset", 0)), int(q["length"])
            with store.lock:
                if "volume" in q:
                    blocks = dict(store.volumes.get(q["volume"], {}))
                else:
                    blocks = dict(self._completed(q["snapshot"]).blocks)
            start(
                "200 OK",
                [("Content-Type", "application/octet-stream"), ("Content-Length", str(length))],
            )
            return store.image(blocks, offset, length)
        if path == "/_standby/blocks":
            with store.lock:
                if "volume" in q:
                    held = sorted(store.volumes.get(q["volume"], {}))
                else:
                    held = sorted(self._completed(q["snapshot"]).blocks)
            return self._json(start, 200, {"blocks": held, "block_size": BLOCK})
        if path == "/_standby/fault" and "clear" in q:
            with self.faults.lock:
                self.faults.pending.clear()
            return self._json(start, 200, {})
        if path == "/_standby/fault":
            self.faults.add(
                q["action"], q["code"], int(q.get("count", 1)), int(q.get("status", 400))
            )
            return self._json(start, 200, {})
        if path == "/_standby/stats":
            with self.faults.lock:
                doc = {"calls": dict(self.faults.calls), "injected": dict(self.faults.injected)}
            with store.lock:
                doc["snapshots"] = {k: v.status for k, v in store.snaps.items()}
            return self._json(start, 200, doc)
        return self._json(start, 404, {"Message": f"no control endpoint {path}"})


def ec2_backend(region: str) -> Any:
    from moto.ec2.models import ec2_backends

    return ec2_backends[ACCOUNT][region]


def patch_moto(store: BlockStore) -> None:
    """Give moto's volumes and EC2 snapshots data (kept in `store`)."""
    from moto.ec2.models import EC2Backend

    orig_snapshot = EC2Backend.create_snapshot
    orig_volume = EC2Backend.create_volume
    orig_del_snapshot = EC2Backend.delete_snapshot
    orig_del_volume = EC2Backend.delete_volume

    def create_snapshot(self: Any, volume_id: str, *args: Any, **kwargs: Any) -> Any:
        snap = orig_snapshot(self, volume_id, *args, **kwargs)
        with store.lock:
            blocks = dict(store.volumes.get(volume_id, {}))
            store.snaps[snap.id] = SnapData(int(snap.volume.size), "completed", blocks)
        return snap

    def create_volume(self: Any, *args: Any, **kwargs: Any) -> Any:
        vol = orig_volume(self, *args, **kwargs)
        sid = kwargs.get("snapshot_id")
        with store.lock:
            src = store.snaps.get(sid) if sid else None
            store.volumes[vol.id] = dict(src.blocks) if src else {}
        return vol

    def delete_snapshot(self: Any, snapshot_id: str) -> Any:
        out = orig_del_snapshot(self, snapshot_id)
        with store.lock:
            store.snaps.pop(snapshot_id, None)
        return out

    def delete_volume(self: Any, volume_id: str) -> Any:
        out = orig_del_volume(self, volume_id)
        with store.lock:
            store.volumes.pop(volume_id, None)
        return out

    EC2Backend.create_snapshot = create_snapshot  # type: ignore[method-assign]
    EC2Backend.create_volume = create_volume  # type: ignore[method-assign]
    EC2Backend.delete_snapshot = delete_snapshot  # type: ignore[method-assign]
    EC2Backend.delete_volume = delete_volume  # type: ignore[method-assign]
