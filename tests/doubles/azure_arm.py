"""A fake Azure Resource Manager (disks, VMs, VNets, NICs, AAD token) served over HTTPS.

It follows the ARM REST contract closely enough for the real ``ComputeManagementClient``,
``NetworkManagementClient`` and ``ClientSecretCredential`` to work against it. Run standalone
with ``python tests/doubles/azure_arm.py --dir DIR --blob-account A --blob-key K``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import ipaddress
import json
import math
import re
import signal
import ssl
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.storage.blob import BlobClient, BlobType

try:
    from .certs import make_cert
except ImportError:  # run as a script: python tests/doubles/azure_arm.py
    from certs import make_cert  # type: ignore[no-redef, import-not-found, unused-ignore]

Json = dict[str, Any]
GIB = 1 << 30
FOOTER = 512
OP_API_VERSION = "2024-03-01"
#: Injected codes that are accepted first and then fail the async operation (like Azure).
ASYNC_FAILURE_CODES = frozenset(
    {"AllocationFailed", "ZonalAllocationFailed", "OverconstrainedAllocationRequest",
     "InternalExecutionError", "InternalOperationError"}
)  # fmt: skip
# name, cores, memory MiB, max data disks, resource (temp) disk MiB
_SIZES = [
    ("Standard_B1s", 1, 1024, 2, 4096),
    ("Standard_B1ms", 1, 2048, 2, 4096),
    ("Standard_B2s", 2, 4096, 4, 8192),
    ("Standard_B2ms", 2, 8192, 4, 16384),
    ("Standard_D2s_v5", 2, 8192, 4, 0),
    ("Standard_D4s_v5", 4, 16384, 8, 0),
    ("Standard_D8s_v5", 8, 32768, 16, 0),
    ("Standard_D16s_v5", 16, 65536, 32, 0),
    ("Standard_E4s_v5", 4, 32768, 8, 0),
    ("Standard_E8s_v5", 8, 65536, 16, 0),
    ("Standard_F2s_v2", 2, 4096, 4, 16384),
    ("Standard_D2_v2", 2, 7168, 8, 102400),
]
# kind -> (resource type, fault/op prefix)
KINDS = {
    "disks": ("Microsoft.Compute/disks", "disk"),
    "vms": ("Microsoft.Compute/virtualMachines", "vm"),
    "nics": ("Microsoft.Network/networkInterfaces", "nic"),
    "vnets": ("Microsoft.Network/virtualNetworks", "vnet"),
    "snapshots": ("Microsoft.Compute/snapshots", "snapshot"),
}
MANAGED = "fake-arm-managed-disks"
"""Azurite container holding the data of managed disks (one page blob each) and snapshots."""
_TYPE_KIND = {rtype.lower(): kind for kind, (rtype, _) in KINDS.items()}
# POST action -> (transient power state, final power state)
_ACTIONS = {
    "powerOff": ("stopping", "stopped"),
    "deallocate": ("deallocating", "deallocated"),
    "start": ("starting", "running"),
    "restart": ("starting", "running"),
}
_SUB = r"/subscriptions/(?P<sub>[^/]+)"
_RG = _SUB + r"/resourceGroups/(?P<rg>[^/]+)/providers/"
_ROUTES = [
    ("GET", _SUB + r"/providers/Microsoft\.Compute/locations/[^/]+/vmSizes", "sizes"),
    ("GET", _SUB + r"/providers/Microsoft\.\w+/locations/[^/]+/operations/(?P<op>[^/]+)",
     "operation"),
    ("GET", r"/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration", "aad_openid"),
    ("POST", r"/(?P<tenant>[^/]+)/oauth2/v2\.0/token", "aad_token"),
    ("GET PUT", _RG + r"Microsoft\.Network/virtualNetworks/(?P<vnet>[^/]+)/subnets/(?P<name>[^/]+)",
     "subnet"),
    ("GET POST", _RG + r"Microsoft\.Compute/virtualMachines/(?P<name>[^/]+)/(?P<action>"
     + "|".join(["instanceView", *_ACTIONS]) + ")", "vm_action"),
    ("POST", _RG + r"Microsoft\.Compute/(?P<type>disks|snapshots)/(?P<name>[^/]+)/"
     r"(?P<action>beginGetAccess|endGetAccess)", "access"),
    ("GET PUT DELETE", _RG + r"(?P<type>Microsoft\.\w+/\w+)/(?P<name>[^/]+)", "resource"),
    ("GET", _RG + r"(?P<type>Microsoft\.\w+/\w+)", "list"),
]  # fmt: skip
_COMPILED = [(m.split(), re.compile(p, re.IGNORECASE), h) for m, p, h in _ROUTES]
_ID = re.compile(
    r"/subscriptions/[^/]+/resourceGroups/([^/]+)/providers/(\w+\.\w+/\w+)/([^/]+)", re.I
)


def managed_blob(rid: str) -> str:
    """The name of the page blob (in container MANAGED) that holds a managed disk's data."""
    return rid.lower().split("/resourcegroups/", 1)[1].replace("/", "-") + ".vhd"


def default_sizes() -> list[Json]:
    """The default ``vmSizes`` list (a fresh copy)."""
    return [
        {"name": n, "numberOfCores": c, "memoryInMB": m, "maxDataDiskCount": d,
         "osDiskSizeInMB": 1047552, "resourceDiskSizeInMB": r}
        for n, c, m, d, r in _SIZES
    ]  # fmt: skip


def _ignore(_failure: Json | None) -> None:
    """Completion callback for operations without side effects."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


class ArmError(Exception):
    """An error answer: ARM shape ``{"error": {"code", "message"}}`` unless ``payload``."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: int | None = None,
        payload: Json | None = None,
    ) -> None:  # fmt: skip
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.retry_after, self.payload = retry_after, payload

    def answer(self) -> tuple[int, Json, dict[str, str]]:
        """The (status, body, headers) triple to send."""
        headers = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        if self.status == 401 and self.payload is None:
            headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        body = self.payload or {"error": {"code": self.code, "message": self.message}}
        return self.status, body, headers


def _not_found(kind: str, name: str) -> ArmError:
    rtype = KINDS[kind][0] if kind in KINDS else kind
    return ArmError(404, "ResourceNotFound", f"The Resource '{rtype}/{name}' was not found.")


@dataclass
class _Fault:
    code: str | None
    status: int | None
    times: int
    retry_after: int
    message: str


@dataclass
class _Operation:
    done: Callable[[Json | None], None]
    error: Json | None
    ready_at: float
    polls_left: int
    status: str = "InProgress"
    start: str = field(default_factory=_now)
    result: Callable[[], Json] | None = None
    """The body the Location URL answers once the operation succeeded (POST actions)."""


@dataclass
class _Req:
    method: str
    g: dict[str, str]
    query: dict[str, str]
    raw: bytes

    def json(self) -> Json:
        try:
            body = json.loads(self.raw or b"{}")
        except ValueError as exc:
            raise ArmError(400, "InvalidRequestContent", f"Invalid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ArmError(400, "InvalidRequestContent", "The request content must be an object.")
        return body


_Answer = tuple[int, Any, dict[str, str]]


class FakeArm:
    """In-process fake ARM + AAD endpoint; see the module docstring.

    ``cert_dir/cert.pem`` and ``key.pem`` are reused when present, else created.
    Tunables: ``sizes`` (vmSizes list), ``polls`` (InProgress answers per async operation),
    ``vhd_alignment`` (imported VHD data size must be a multiple; Azure itself wants 1 MiB).
    An async operation completes once polled ``polls`` times and its ``slow`` time has passed.
    """

    def __init__(
        self,
        blob_account: str,
        blob_key: str,
        blob_ca: Path | None,
        cert_dir: Path,
        resource_groups: Iterable[str] = ("standby-dr",),
        location: str = "westeurope",
        *,
        port: int = 0,
    ) -> None:
        self.blob_account, self.blob_key, self.blob_ca = blob_account, blob_key, blob_ca
        self.blob_base: str | None = None
        self._container_made = False
        """Azurite's account URL; learnt from the first imported blob."""
        self.resource_groups = list(resource_groups)
        self.location = location
        if (cert_dir / "cert.pem").exists() and (cert_dir / "key.pem").exists():
            self.cert, self.key = cert_dir / "cert.pem", cert_dir / "key.pem"
        else:
            self.cert, self.key = make_cert(cert_dir)
        self.apps: dict[tuple[str, str], str] = {}
        self.port = port
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    # ----------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        """Base URL, e.g. ``https://127.0.0.1:PORT`` (use as ``base_url`` / ``authority``)."""
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Listen on 127.0.0.1 (free port if 0) in a background thread."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        self._server = _Server(self, ctx, self.port)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------- test controls
    def reset(self) -> None:
        """Forget resources, operations, faults, requests, tunables (apps are kept)."""
        with self._lock:
            self.sizes = default_sizes()
            self.polls = 1
            self.vhd_alignment = FOOTER
            self.requests: list[tuple[str, str, int]] = []
            self.issued_tokens: list[str] = []
            self.seen_tokens: set[str] = set()
            self._store: dict[str, dict[tuple[str, str], Json]] = {k: {} for k in KINDS}
            self._vm_state: dict[str, Json] = {}
            self._ops: dict[str, _Operation] = {}
            self._faults: dict[str, _Fault] = {}
            self._slow: dict[str, float] = {}

    def inject(
        self, op: str, *, code: str | None = None, status: int | None = None, times: int = 1,
        retry_after: int = 0, message: str = "",
    ) -> None:  # fmt: skip
        """Make the next ``times`` calls of ``op`` (e.g. ``"vm.create"``) fail.

        ``status`` given: immediate answer with that status (429 -> ``TooManyRequests`` and
        ``Retry-After``). Else a ``code`` in :data:`ASYNC_FAILURE_CODES` is accepted and the
        async operation ends ``Failed`` (resource left in provisioningState Failed); any other
        code is an immediate 409.
        """
        with self._lock:
            self._faults[op] = _Fault(code, status, times, retry_after, message)

    def slow(self, op: str, seconds: float) -> None:
        """Keep async operations of ``op`` InProgress for at least ``seconds``."""
        with self._lock:
            self._slow[op] = seconds

    def add_app(self, tenant: str, client_id: str, secret: str) -> None:
        """Register a service principal accepted by the token endpoint."""
        with self._lock:
            self.apps[(tenant.lower(), client_id)] = secret

    def resources(self, kind: str) -> dict[str, Json]:
        """Current resources of ``kind`` ("disks", "vms", "nics", "vnets") keyed by name."""
        with self._lock:
            return {r["name"]: self._render(kind, r, {}) for r in self._store[kind].values()}

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, method: str, target: str, headers: Mapping[str, str], raw: bytes) -> _Answer:
        """Answer one request (lower-case ``headers``): (status, body or None, headers)."""
        split = urlsplit(target)
        path = split.path.rstrip("/")
        query = {k.lower(): v[-1] for k, v in parse_qs(split.query).items()}
        try:
            with self._lock:
                self._settle()
                answer = self._route(method, path, query, headers, raw)
        except ArmError as err:
            answer = err.answer()
        except Exception as exc:  # a bug in the fake: make it loud
            traceback.print_exc()
            answer = ArmError(500, "FakeArmBug", repr(exc)).answer()
        with self._lock:
            self.requests.append((method, path, answer[0]))
        return answer

    def _route(
        self, method: str, path: str, query: dict[str, str], headers: Mapping[str, str], raw: bytes
    ) -> _Answer:
        for methods, pattern, handler in _COMPILED:
            match = pattern.fullmatch(path)
            if not match:
                continue
            if method not in methods:
                raise ArmError(405, "MethodNotAllowed", f"{method} is not supported on {path}")
            g = match.groupdict()
            if not handler.startswith("aad"):
                self._authorize(headers.get("authorization") or "")
                if "api-version" not in query:
                    raise ArmError(400, "MissingApiVersionParameter", "api-version is required.")
                if "rg" in g and g["rg"].lower() not in {r.lower() for r in self.resource_groups}:
                    msg = f"Resource group '{g['rg']}' could not be found."
                    raise ArmError(404, "ResourceGroupNotFound", msg)
            answer: _Answer = getattr(self, "_h_" + handler)(_Req(method, g, query, raw))
            return answer
        raise ArmError(404, "NotFound", f"No fake route for {method} {path}")

    def _authorize(self, header: str) -> None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ArmError(401, "AuthenticationFailed", "Missing or malformed bearer token.")
        self.seen_tokens.add(token.strip())

    # -------------------------------------------------------- faults, operations
    def _fault(self, op: str, *, can_async: bool = True) -> Json | None:
        """Raise an injected immediate fault, or return an async error to fail with."""
        fault = self._faults.get(op)
        if fault is None or fault.times <= 0:
            return None
        fault.times -= 1
        code = fault.code or ("TooManyRequests" if fault.status == 429 else "InternalServerError")
        message = fault.message or f"Injected {code} for {op}."
        if fault.status is None and code in ASYNC_FAILURE_CODES and can_async:
            return {"code": code, "message": message}
        retry = fault.retry_after if fault.status == 429 or fault.retry_after else None
        raise ArmError(fault.status or 409, code, message, retry_after=retry)

    def _start_op(
        self, op: str, sub: str, rtype: str, done: Callable[[Json | None], None],
        error: Json | None, result: Callable[[], Json] | None = None,
    ) -> dict[str, str]:  # fmt: skip
        oid = str(uuid.uuid4())
        ready = time.monotonic() + self._slow.get(op, 0.0)
        self._ops[oid] = _Operation(done, error, ready, self.polls, result=result)
        namespace = rtype.split("/")[0]
        base = f"{self.url}/subscriptions/{sub}/providers/{namespace}/locations/{self.location}"
        url = f"{base}/operations/{oid}?api-version={OP_API_VERSION}"
        return {"Azure-AsyncOperation": url, "Location": url + "&monitor=true", "Retry-After": "0"}

    def _finish(self, op: _Operation) -> None:
        op.status = "Failed" if op.error else "Succeeded"
        op.done(op.error)

    def _settle(self) -> None:
        now = time.monotonic()
        for op in self._ops.values():
            if op.status == "InProgress" and op.polls_left <= 0 and now >= op.ready_at:
                self._finish(op)

    def _h_operation(self, req: _Req) -> _Answer:
        op = self._ops.get(req.g["op"])
        if op is None:
            raise _not_found("operations", req.g["op"])
        monitor = "monitor" in req.query
        if op.status == "InProgress" and not monitor:
            if op.polls_left > 0 or time.monotonic() < op.ready_at:
                op.polls_left = max(0, op.polls_left - 1)
            else:
                self._finish(op)
        body: Json = {"name": req.g["op"], "status": op.status, "startTime": op.start}
        if op.error and op.status == "Failed":
            body["error"] = op.error
        if op.status != "InProgress":
            body["endTime"] = _now()
        headers = {"Retry-After": "0"}
        if monitor and op.status == "Succeeded" and op.result is not None:
            return 200, op.result(), headers
        return (202 if monitor and op.status == "InProgress" else 200), body, headers

    # ------------------------------------------------------------------ helpers
    def _by_id(self, kind: str, rid: str) -> Json | None:
        match = _ID.fullmatch(rid or "")
        if not match or _TYPE_KIND.get(match[2].lower()) != kind:
            return None
        return self._store[kind].get((match[1].lower(), match[3].lower()))

    def _envelope(self, rid: str, name: str, kind: str, body: Json, props: Json) -> Json:
        return {
            "id": rid, "name": name, "type": KINDS[kind][0],
            "location": body.get("location") or self.location,
            "tags": body.get("tags") or {}, "properties": props,
        }  # fmt: skip

    def _render(self, kind: str, res: Json, query: dict[str, str]) -> Json:
        out = {k: copy.deepcopy(v) for k, v in res.items() if not k.startswith("_")}
        if kind == "disks":
            owner = res.get("managedBy")
            power = self._vm_state.get(str(owner).lower(), {}).get("power")
            state = "Reserved" if power == "deallocated" else "Attached"
            out["properties"]["diskState"] = state if owner else "Unattached"
        if kind == "vms" and query.get("$expand", "").lower() == "instanceview":
            out["properties"]["instanceView"] = self._instance_view(res)
        return out

    def _instance_view(self, vm: Json) -> Json:
        state = self._vm_state.get(vm["id"].lower(), {})
        prov = vm["properties"]["provisioningState"]
        code = f"ProvisioningState/{prov.lower()}"
        if state.get("error"):
            code += "/" + state["error"]["code"]
        statuses = [{"code": code, "level": "Error" if prov == "Failed" else "Info",
                     "displayStatus": f"Provisioning {prov.lower()}", "time": _now()}]  # fmt: skip
        if state.get("power"):
            power = state["power"]
            statuses.append(
                {"code": f"PowerState/{power}", "level": "Info", "displayStatus": f"VM {power}"}
            )
        return {"computerName": vm["name"], "statuses": statuses}

    def _subnet_in_use(self, subnet_prefix: str) -> bool:
        """Whether any NIC IP configuration uses a subnet id starting with ``subnet_prefix``."""
        prefix = subnet_prefix.lower()
        return any(
            ipc["properties"]["subnet"]["id"].lower().startswith(prefix)
            for nic in self._store["nics"].values()
            for ipc in nic["properties"]["ipConfigurations"]
        )

    # ------------------------------------------------------------ sync handlers
    def _h_sizes(self, req: _Req) -> _Answer:
        self._fault("sizes.list", can_async=False)
        return 200, {"value": copy.deepcopy(self.sizes)}, {}

    def _h_list(self, req: _Req) -> _Answer:
        kind = _TYPE_KIND.get(req.g["type"].lower())
        if kind is None:
            raise ArmError(400, "InvalidResourceType", f"Unsupported type {req.g['type']}.")
        self._fault(KINDS[kind][1] + ".list", can_async=False)
        rg = req.g["rg"].lower()
        items = [
            self._render(kind, r, req.query) for (g, _), r in self._store[kind].items() if g == rg
        ]
        return 200, {"value": items}, {}

    # ------------------------------------------------------- generic resources
    def _h_resource(self, req: _Req) -> _Answer:
        kind = _TYPE_KIND.get(req.g["type"].lower())
        if kind is None:
            raise ArmError(400, "InvalidResourceType", f"Unsupported type {req.g['type']}.")
        rtype, prefix = KINDS[kind]
        sub, rg, name = req.g["sub"], req.g["rg"], req.g["name"]
        key, store = (rg.lower(), name.lower()), self._store[kind]
        if req.method == "GET":
            self._fault(prefix + ".get", can_async=False)
            if key not in store:
                raise _not_found(kind, name)
            return 200, self._render(kind, store[key], req.query), {}
        if req.method == "PUT":
            error = self._fault(prefix + ".create")
            old = store.get(key)
            rid = f"/subscriptions/{sub}/resourceGroups/{rg}/providers/{rtype}/{name}"
            res: Json = getattr(self, "_build_" + kind)(rid, name, req.json(), old)
            network = rtype.startswith("Microsoft.Network")
            res["properties"]["provisioningState"] = "Updating" if network or old else "Creating"
            store[key] = res
            headers = self._start_op(prefix + ".create", sub, rtype, self._on_put(kind, res), error)
            status = 202 if kind in ("disks", "snapshots") else 200 if old else 201
            return status, self._render(kind, res, {}), headers
        res = store.get(key) or {}
        if not res:
            return 204, None, {}
        self._check_delete(kind, res)
        error = self._fault(prefix + ".delete")
        previous = res["properties"]["provisioningState"]
        res["properties"]["provisioningState"] = "Deleting"

        def deleted(failure: Json | None) -> None:
            if failure:
                res["properties"]["provisioningState"] = previous
            elif store.get(key) is res:
                del store[key]
                self._release_data(kind, res)
                if kind == "vms":
                    self._detach(res["id"])
                    self._vm_state.pop(res["id"].lower(), None)

        return 202, None, self._start_op(prefix + ".delete", sub, rtype, deleted, error)

    def _release_data(self, kind: str, res: Json) -> None:
        """Drop the Azurite data of a deleted disk or snapshot (a disk's blob stays while
        snapshots of it exist: Azure snapshots outlive their disk)."""
        from azure.core.exceptions import ResourceNotFoundError

        with contextlib.suppress(ResourceNotFoundError):
            if kind == "snapshots":
                self._blob(res["_blob"], res["_snapshot"]).delete_blob()
            elif (
                kind == "disks"
                and res.get("_blob")
                and not any(s["_blob"] == res["_blob"] for s in self._store["snapshots"].values())
            ):
                self._blob(res["_blob"]).delete_blob(delete_snapshots="include")

    def _on_put(self, kind: str, res: Json) -> Callable[[Json | None], None]:
        def done(failure: Json | None) -> None:
            res["properties"]["provisioningState"] = "Failed" if failure else "Succeeded"
            state = self._vm_state.get(res["id"].lower()) if kind == "vms" else None
            if state is not None:  # (None: the VM was deleted or the fake reset meanwhile)
                if state.get("power") == "starting":
                    state["power"] = "deallocated" if failure else "running"
                state["error"] = failure

        return done

    def _check_delete(self, kind: str, res: Json) -> None:
        if res.get("_access"):
            msg = f"{res['name']} has an active SAS URI; revoke access (endGetAccess) first."
            raise ArmError(409, "OperationNotAllowed", msg)
        if kind == "disks" and res.get("managedBy"):
            msg = f"Disk {res['name']} is attached to VM {res['managedBy']}."
            raise ArmError(409, "OperationNotAllowed", msg)
        if kind == "nics" and res["properties"].get("virtualMachine"):
            vm = res["properties"]["virtualMachine"]["id"]
            raise ArmError(400, "NicInUse", f"Network Interface {res['id']} is used by {vm}.")
        if kind == "vnets" and self._subnet_in_use(res["id"] + "/subnets/"):
            msg = f"Subnets of {res['id']} are in use by network interfaces."
            raise ArmError(400, "InUseSubnetCannotBeDeleted", msg)

    # ------------------------------------------------------------------- disks
    def _build_disks(self, rid: str, name: str, body: Json, old: Json | None) -> Json:
        props = dict(body.get("properties") or {})
        data = dict(props.get("creationData") or {})
        option = str(data.get("createOption", "")).lower()
        if old is not None:  # update: only tags (and passthrough properties) change
            res = copy.deepcopy(old)
            res["tags"] = body.get("tags", old["tags"])
            return res
        if option == "import":
            if not data.get("sourceUri") or not data.get("storageAccountId"):
                msg = "Import requires creationData.sourceUri and creationData.storageAccountId."
                raise ArmError(400, "InvalidParameter", msg)
            account = str(data["storageAccountId"]).rsplit("/", 1)[-1]
            nbytes = self._inspect_vhd(name, data["sourceUri"], account) - FOOTER
            backing = self._copy_in(rid, data["sourceUri"], nbytes + FOOTER)
        elif option == "empty":
            if not isinstance(props.get("diskSizeGB"), int) or props["diskSizeGB"] < 1:
                raise ArmError(400, "InvalidParameter", "diskSizeGB is required for Empty.")
            nbytes = props["diskSizeGB"] * GIB
            backing = self._copy_in(rid, None, nbytes + FOOTER)
        else:
            msg = f"createOption {data.get('createOption')!r} is not supported by the fake."
            raise ArmError(400, "InvalidParameter", msg)
        props.update(
            creationData=data, diskSizeGB=max(1, math.ceil(nbytes / GIB)), diskSizeBytes=nbytes,
            uniqueId=str(uuid.uuid4()), timeCreated=_now(),
        )  # fmt: skip
        res = self._envelope(rid, name, "disks", body, props)
        res["sku"] = body.get("sku") or {"name": "Standard_LRS", "tier": "Standard"}
        res["_blob"], res["_access"] = backing, None
        return res

    # ------------------------------------------------- managed disk data, snapshots
    def _blob(self, name: str, snapshot: str | None = None) -> BlobClient:
        """A blob of the fake's own container in Azurite (where managed disks keep data)."""
        if self.blob_base is None:
            raise ArmError(500, "FakeArmBug", "no blob endpoint known yet (import a disk first)")
        credential = {"account_name": self.blob_account, "account_key": self.blob_key}
        return BlobClient(
            self.blob_base, MANAGED, name, snapshot=snapshot, credential=credential,
            connection_verify=str(self.blob_ca) if self.blob_ca else True,
        )  # fmt: skip

    def _copy_in(self, rid: str, source_uri: str | None, size: str | int) -> str:
        """Give a new managed disk its own page blob: a copy of the import source, or zeroes."""
        from azure.core.exceptions import ResourceExistsError

        parts = urlsplit(source_uri or "")
        if source_uri:
            account = parts.path.strip("/").split("/")[0]
            self.blob_base = self.blob_base or f"{parts.scheme}://{parts.netloc}/{account}"
        name = managed_blob(rid)
        if self.blob_base is None:
            return ""  # an Empty disk before any import: no data kept (nothing reads it)
        dest = self._blob(name)
        if not self._container_made:
            from azure.storage.blob import ContainerClient

            container = ContainerClient(
                self.blob_base, MANAGED,
                credential={"account_name": self.blob_account, "account_key": self.blob_key},
                connection_verify=str(self.blob_ca) if self.blob_ca else True,
            )  # fmt: skip
            with contextlib.suppress(ResourceExistsError):
                container.create_container()
            self._container_made = True
        dest.create_page_blob(int(size))
        if source_uri:
            snap = parse_qs(parts.query).get("snapshot")
            src = BlobClient.from_blob_url(
                f"{parts.scheme}://{parts.netloc}{parts.path}",
                snapshot=snap[0] if snap else None,
                credential={"account_name": self.blob_account, "account_key": self.blob_key},
                connection_verify=str(self.blob_ca) if self.blob_ca else True,
            )
            for r in src.list_page_ranges():
                start, stop = int(r.start or 0), int(r.end or 0) + 1  # end is inclusive
                for off in range(start, stop, 4 << 20):
                    n = min(4 << 20, stop - off)
                    data = src.download_blob(offset=off, length=n).readall()
                    dest.upload_page(data, offset=off, length=n)
        return name

    def disk_data(self, name: str, rg: str | None = None) -> BlobClient:
        """The page blob behind managed disk ``name`` (a test writes to it as the guest would)."""
        with self._lock:
            res = self._store["disks"].get(((rg or self.resource_groups[0]).lower(), name.lower()))
            if res is None:
                raise KeyError(f"no managed disk {name}")
            return self._blob(res["_blob"])

    def _build_snapshots(self, rid: str, name: str, body: Json, old: Json | None) -> Json:
        props = dict(body.get("properties") or {})
        data = dict(props.get("creationData") or {})
        if old is not None:
            res = copy.deepcopy(old)
            res["tags"] = body.get("tags", old["tags"])
            return res
        if str(data.get("createOption", "")).lower() != "copy":
            raise ArmError(400, "InvalidParameter", "The fake only makes snapshots by Copy.")
        disk = self._by_id("disks", str(data.get("sourceResourceId", "")))
        if disk is None:
            msg = f"Source disk {data.get('sourceResourceId')} was not found."
            raise ArmError(404, "NotFound", msg)
        snap = self._blob(disk["_blob"]).create_snapshot()["snapshot"]
        props.update(
            creationData=data, diskSizeBytes=disk["properties"]["diskSizeBytes"],
            diskSizeGB=disk["properties"]["diskSizeGB"], incremental=bool(props.get("incremental")),
            uniqueId=str(uuid.uuid4()), timeCreated=_now(),
            osType=disk["properties"].get("osType"),
            hyperVGeneration=disk["properties"].get("hyperVGeneration"),
        )  # fmt: skip
        res = self._envelope(rid, name, "snapshots", body, props)
        res["_blob"], res["_snapshot"], res["_access"] = disk["_blob"], snap, None
        return res

    def _h_access(self, req: _Req) -> _Answer:
        """beginGetAccess / endGetAccess: a read SAS on the data of a disk or snapshot."""
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        kind = req.g["type"].lower()
        res = self._store[kind].get((req.g["rg"].lower(), req.g["name"].lower()))
        if res is None:
            raise _not_found(kind, req.g["name"])
        prefix = KINDS[kind][1]
        if req.g["action"].lower() == "endgetaccess":
            error = self._fault(prefix + ".endGetAccess")

            def revoked(failure: Json | None) -> None:
                if not failure:
                    res["_access"] = None

            rtype = KINDS[kind][0]
            return 202, None, self._start_op(prefix + ".endGetAccess", req.g["sub"], rtype,
                                             revoked, error)  # fmt: skip
        body = req.json()
        if str(body.get("access", "")).lower() not in ("read", "write"):
            raise ArmError(400, "InvalidParameter", "access must be Read or Write.")
        seconds = body.get("durationInSeconds")
        if not isinstance(seconds, int) or seconds < 1:
            raise ArmError(400, "InvalidParameter", "durationInSeconds is required.")
        owner = res.get("managedBy")
        if kind == "disks" and owner:
            power = self._vm_state.get(str(owner).lower(), {}).get("power")
            if power != "deallocated":
                msg = (f"Disk {res['name']} is attached to VM {owner}. Disk can be exported only "
                       "when it is unattached or attached to a deallocated VM.")  # fmt: skip
                raise ArmError(409, "OperationNotAllowed", msg)
        error = self._fault(prefix + ".beginGetAccess")
        expiry = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
        sas = generate_blob_sas(
            self.blob_account, MANAGED, res["_blob"], snapshot=res.get("_snapshot"),
            account_key=self.blob_key, permission=BlobSasPermissions(read=True), expiry=expiry,
        )  # fmt: skip
        url = f"{self.blob_base}/{MANAGED}/{res['_blob']}?"
        url += f"snapshot={res['_snapshot']}&" if res.get("_snapshot") else ""
        url += sas

        def granted(failure: Json | None) -> None:
            if not failure:
                res["_access"] = url

        return 202, None, self._start_op(
            prefix + ".beginGetAccess", req.g["sub"], KINDS[kind][0], granted, error,
            result=lambda: {"accessSAS": url},
        )  # fmt: skip

    def _inspect_vhd(self, disk: str, uri: str, account: str) -> int:
        """Check the import source like Azure does; return the blob size in bytes."""
        parts = urlsplit(uri)
        snapshot = parse_qs(parts.query).get("snapshot")
        url = f"{parts.scheme}://{parts.netloc}{parts.path}"
        url += f"?snapshot={snapshot[0]}" if snapshot else ""
        credential = {"account_name": self.blob_account, "account_key": self.blob_key}
        verify: str | bool = str(self.blob_ca) if self.blob_ca else True
        blob = BlobClient.from_blob_url(
            url,
            credential=credential,
            connection_verify=verify,
            retry_total=0,
            connection_timeout=5,
        )
        if blob.account_name != account:
            msg = f"storageAccountId {account!r} does not own {uri}."
            raise ArmError(400, "InvalidParameter", msg)
        try:
            props = blob.get_blob_properties()
            size = props.size
            footer = blob.download_blob(offset=size - FOOTER, length=FOOTER).readall() if (
                size >= FOOTER) else b""  # fmt: skip
        except ResourceNotFoundError as exc:
            msg = f"The source blob {uri} for disk '{disk}' does not exist."
            raise ArmError(400, "BlobNotFound", msg) from exc
        except AzureError as exc:
            msg = f"Cannot access source blob {uri}: {exc.message}"
            raise ArmError(400, "CannotAccessBlob", msg) from exc
        if props.blob_type != BlobType.PAGEBLOB:
            raise ArmError(400, "InvalidVhd", "Only page blobs can be imported as VHDs.")
        if size < FOOTER or (size - FOOTER) % self.vhd_alignment:
            msg = f"Disk '{disk}' with blob {uri} has unsupported virtual size of {size} bytes."
            raise ArmError(400, "InvalidVhd", msg)
        if not footer.startswith(b"conectix"):
            msg = (
                f"The specified cookie value in VHD footer indicates that disk '{disk}' with blob "
                f"{uri} is not a supported VHD. Disk is expected to have cookie value 'conectix'."
            )
            raise ArmError(400, "InvalidVhd", msg)
        return size

    # ---------------------------------------------------------------- network
    def _make_subnet(self, vnet_id: str, spec: Json, space: list[Any]) -> Json:
        props = dict(spec.get("properties") or {})
        prefix = props.get("addressPrefix") or (props.get("addressPrefixes") or [None])[0]
        try:
            net = ipaddress.ip_network(str(prefix))
        except ValueError as exc:
            raise ArmError(400, "InvalidAddressPrefixFormat", f"Bad prefix {prefix!r}") from exc
        if space and not any(net.version == s.version and net.subnet_of(s) for s in space):
            raise ArmError(400, "NetcfgSubnetRangeOutsideVnet", f"{prefix} is outside the VNet.")
        props.update(addressPrefix=str(net), provisioningState="Succeeded")
        name = spec.get("name") or ""
        rtype = "Microsoft.Network/virtualNetworks/subnets"
        return {"id": f"{vnet_id}/subnets/{name}", "name": name, "type": rtype, "properties": props}

    def _build_vnets(self, rid: str, name: str, body: Json, old: Json | None) -> Json:
        props = dict(body.get("properties") or {})
        prefixes = (props.get("addressSpace") or {}).get("addressPrefixes") or []
        try:
            space = [ipaddress.ip_network(p) for p in prefixes]
        except ValueError as exc:
            raise ArmError(400, "InvalidAddressPrefixFormat", str(exc)) from exc
        subnets = [self._make_subnet(rid, s, space) for s in props.get("subnets") or []]
        kept = {s["name"].lower() for s in subnets}
        for gone in (old or {"properties": {"subnets": []}})["properties"]["subnets"]:
            if gone["name"].lower() not in kept and self._subnet_in_use(gone["id"]):
                raise ArmError(400, "InUseSubnetCannotBeDeleted", f"{gone['id']} is in use.")
        props.update(subnets=subnets, resourceGuid=str(uuid.uuid4()))
        return self._envelope(rid, name, "vnets", body, props)

    def _h_subnet(self, req: _Req) -> _Answer:
        vnet = self._store["vnets"].get((req.g["rg"].lower(), req.g["vnet"].lower()))
        if vnet is None:
            raise _not_found("vnets", req.g["vnet"])
        subnets: list[Json] = vnet["properties"]["subnets"]
        index = next((i for i, s in enumerate(subnets) if s["name"].lower() ==
                      req.g["name"].lower()), None)  # fmt: skip
        if req.method == "GET":
            self._fault("subnet.get", can_async=False)
            if index is None:
                raise ArmError(404, "NotFound", f"Subnet {req.g['name']} was not found.")
            return 200, copy.deepcopy(subnets[index]), {}
        error = self._fault("subnet.create")
        space = [
            ipaddress.ip_network(p) for p in vnet["properties"]["addressSpace"]["addressPrefixes"]
        ]
        subnet = self._make_subnet(vnet["id"], {**req.json(), "name": req.g["name"]}, space)
        if index is None:
            subnets.append(subnet)
        else:
            subnets[index] = subnet
        headers = self._start_op("subnet.create", req.g["sub"], KINDS["vnets"][0], _ignore, error)
        return 201 if index is None else 200, copy.deepcopy(subnet), headers

    def _find_subnet(self, subnet_id: str) -> Json | None:
        vnet_id, _, name = subnet_id.rpartition("/subnets/")
        vnet = self._by_id("vnets", vnet_id)
        subnets = vnet["properties"]["subnets"] if vnet else []
        return next((s for s in subnets if s["name"].lower() == name.lower()), None)

    def _allocate_ip(self, subnet: Json, nic_id: str, wanted: str | None) -> str:
        net = ipaddress.ip_network(subnet["properties"]["addressPrefix"])
        used = {
            ipc["properties"]["privateIPAddress"]
            for nic in self._store["nics"].values() if nic["id"].lower() != nic_id.lower()
            for ipc in nic["properties"]["ipConfigurations"]
        }  # fmt: skip
        if wanted:
            if ipaddress.ip_address(wanted) not in net or wanted in used:
                raise ArmError(400, "PrivateIPAddressNotAvailable", f"{wanted} is not available.")
            return wanted
        for offset in range(4, net.num_addresses - 1):  # Azure reserves .0-.3 and broadcast
            candidate = str(net.network_address + offset)
            if candidate not in used:
                return candidate
        raise ArmError(400, "SubnetIsFull", f"Subnet {subnet['id']} has no free addresses.")

    def _build_nics(self, rid: str, name: str, body: Json, old: Json | None) -> Json:
        props = dict(body.get("properties") or {})
        configs = props.get("ipConfigurations") or []
        if not configs:
            raise ArmError(400, "InvalidParameter", "At least one ipConfiguration is required.")
        previous = {c["name"]: c["properties"] for c in (old or {}).get("properties", {}).get(
            "ipConfigurations", [])}  # fmt: skip
        out = []
        for i, config in enumerate(configs):
            cprops = dict(config.get("properties") or {})
            sid = (cprops.get("subnet") or {}).get("id", "")
            subnet = self._find_subnet(sid)
            if subnet is None:
                msg = f"Resource {sid} referenced by resource {rid} was not found."
                raise ArmError(400, "InvalidResourceReference", msg)
            cname = config.get("name") or f"ipconfig{i + 1}"
            before = previous.get(cname, {})
            static = str(cprops.get("privateIPAllocationMethod", "")).lower() == "static"
            keep = before.get("privateIPAddress") if before.get("subnet") == {
                "id": subnet["id"]} else None  # fmt: skip
            ip = self._allocate_ip(subnet, rid, cprops.get("privateIPAddress") if static else keep)
            cprops.update(
                privateIPAddress=ip, privateIPAddressVersion="IPv4", subnet={"id": subnet["id"]},
                privateIPAllocationMethod="Static" if static else "Dynamic",
                primary=cprops.get("primary", i == 0), provisioningState="Succeeded",
            )  # fmt: skip
            out.append({"id": f"{rid}/ipConfigurations/{cname}", "name": cname,
                        "type": "Microsoft.Network/networkInterfaces/ipConfigurations",
                        "properties": cprops})  # fmt: skip
        props["ipConfigurations"] = out
        if old and old["properties"].get("virtualMachine"):
            props["virtualMachine"] = old["properties"]["virtualMachine"]
        return self._envelope(rid, name, "nics", body, props)

    # --------------------------------------------------------------------- VMs
    def _build_vms(self, rid: str, name: str, body: Json, old: Json | None) -> Json:
        props = dict(body.get("properties") or {})
        size = (props.get("hardwareProfile") or {}).get("vmSize")
        spec = next((s for s in self.sizes if s["name"].lower() == str(size).lower()), None)
        if spec is None:
            msg = f"The requested VM size {size} is not available in location {self.location}."
            raise ArmError(400, "InvalidParameter", msg)
        storage = props.get("storageProfile") or {}
        os_disk, data_disks = storage.get("osDisk"), list(storage.get("dataDisks") or [])
        if not os_disk:
            raise ArmError(400, "InvalidParameter", "Required parameter 'osDisk' is missing.")
        if len(data_disks) > spec["maxDataDiskCount"]:
            msg = f"{spec['name']} allows at most {spec['maxDataDiskCount']} data disks."
            raise ArmError(409, "OperationNotAllowed", msg)
        luns = [d.get("lun") for d in data_disks]
        if None in luns or len(set(luns)) != len(luns):
            raise ArmError(400, "InvalidParameter", "Each data disk needs a unique lun.")
        disks = [self._attachable_disk(d, rid) for d in [os_disk, *data_disks]]
        nic_refs = (props.get("networkProfile") or {}).get("networkInterfaces") or []
        if not nic_refs:
            raise ArmError(400, "InvalidParameter", "At least one network interface is required.")
        nics = [self._attachable_nic(ref.get("id", ""), rid) for ref in nic_refs]
        self._detach(rid)
        for disk in disks:
            disk["managedBy"] = rid
        for nic in nics:
            nic["properties"]["virtualMachine"] = {"id": rid}
        os_type = os_disk.get("osType") or disks[0]["properties"].get("osType")
        entries = [{**spec_, "name": d["name"], "managedDisk": {"id": d["id"]},
                    "diskSizeGB": d["properties"]["diskSizeGB"]}
                   for spec_, d in zip([os_disk, *data_disks], disks, strict=True)]  # fmt: skip
        entries[0]["osType"] = os_type
        props.update(
            hardwareProfile={"vmSize": spec["name"]},
            storageProfile={**storage, "osDisk": entries[0], "dataDisks": entries[1:]},
            vmId=old["properties"]["vmId"] if old else str(uuid.uuid4()),
            timeCreated=old["properties"]["timeCreated"] if old else _now(),
        )  # fmt: skip
        state = self._vm_state.setdefault(rid.lower(), {})
        if old is None or old["properties"]["provisioningState"] == "Failed":
            state.update(power="starting", error=None)  # a PUT on a Failed VM retries it
        return self._envelope(rid, name, "vms", body, props)

    def _attachable_disk(self, ref: Json, vm_id: str) -> Json:
        if str(ref.get("createOption", "")).lower() != "attach":
            raise ArmError(400, "InvalidParameter", "The fake only supports createOption Attach.")
        disk_id = (ref.get("managedDisk") or {}).get("id", "")
        disk = self._by_id("disks", disk_id)
        if disk is None:
            raise ArmError(400, "InvalidParameter", f"Managed disk {disk_id} was not found.")
        if disk["properties"]["provisioningState"] != "Succeeded":
            raise ArmError(409, "OperationNotAllowed", f"Disk {disk_id} is not ready.")
        owner = disk.get("managedBy")
        if owner and owner.lower() != vm_id.lower():
            raise ArmError(409, "OperationNotAllowed", f"Disk {disk_id} is attached to {owner}.")
        return disk

    def _attachable_nic(self, nic_id: str, vm_id: str) -> Json:
        nic = self._by_id("nics", nic_id)
        if nic is None:
            msg = f"Resource {nic_id} referenced by resource {vm_id} was not found."
            raise ArmError(400, "InvalidResourceReference", msg)
        owner = (nic["properties"].get("virtualMachine") or {}).get("id")
        if owner and owner.lower() != vm_id.lower():
            raise ArmError(400, "NicInUse", f"Network Interface {nic_id} is used by {owner}.")
        return nic

    def _detach(self, vm_id: str) -> None:
        for disk in self._store["disks"].values():
            if str(disk.get("managedBy")).lower() == vm_id.lower():
                del disk["managedBy"]
        for nic in self._store["nics"].values():
            owner = nic["properties"].get("virtualMachine") or {}
            if owner.get("id", "").lower() == vm_id.lower():
                del nic["properties"]["virtualMachine"]

    def _h_vm_action(self, req: _Req) -> _Answer:
        vm = self._store["vms"].get((req.g["rg"].lower(), req.g["name"].lower()))
        action = next(
            a for a in ["instanceView", *_ACTIONS] if a.lower() == req.g["action"].lower()
        )
        if (req.method == "GET") != (action == "instanceView"):
            raise ArmError(405, "MethodNotAllowed", f"{req.method} not allowed for {action}.")
        if vm is None:
            raise _not_found("vms", req.g["name"])
        if action == "instanceView":
            self._fault("vm.instanceView", can_async=False)
            return 200, self._instance_view(vm), {}
        error = self._fault("vm." + action)
        state = self._vm_state[vm["id"].lower()]
        previous, (transient, final) = state.get("power"), _ACTIONS[action]
        state["power"] = transient

        def done(failure: Json | None) -> None:
            state["power"] = previous if failure else final

        return 202, None, self._start_op("vm." + action, req.g["sub"], KINDS["vms"][0], done, error)

    # --------------------------------------------------------------------- AAD
    def _h_aad_openid(self, req: _Req) -> _Answer:
        base = f"{self.url}/{req.g['tenant']}"
        return 200, {
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
            "response_types_supported": ["code", "id_token", "code id_token", "token id_token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
        }, {}  # fmt: skip

    def _h_aad_token(self, req: _Req) -> _Answer:
        form = {k: v[-1] for k, v in parse_qs(req.raw.decode()).items()}
        tenant, client = req.g["tenant"], form.get("client_id", "")

        def fail(status: int, error: str, code: int, text: str) -> ArmError:
            desc = f"AADSTS{code}: {text}"
            payload = {"error": error, "error_description": desc, "error_codes": [code],
                       "timestamp": _now(), "trace_id": str(uuid.uuid4())}  # fmt: skip
            return ArmError(status, error, desc, payload=payload)

        self._fault("aad.token", can_async=False)
        if form.get("grant_type") != "client_credentials":
            raise fail(400, "unsupported_grant_type", 70003, "Only client_credentials is faked.")
        secret = self.apps.get((tenant.lower(), client))
        if secret is None:
            text = f"Application with identifier '{client}' was not found in '{tenant}'."
            raise fail(400, "unauthorized_client", 700016, text)
        if form.get("client_secret") != secret:
            text = f"Invalid client secret provided for app '{client}'."
            raise fail(401, "invalid_client", 7000215, text)
        token = f"fake-arm-token-{uuid.uuid4()}"
        self.issued_tokens.append(token)
        body = {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
                "access_token": token}  # fmt: skip
        return 200, body, {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 60
    server: _Server

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        status, payload, headers = self.server.arm.dispatch(
            self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, raw
        )
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        headers = {"x-ms-request-id": str(uuid.uuid4()), **headers}
        if body:
            headers["Content-Type"] = "application/json; charset=utf-8"
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet; requests are recorded in ``FakeArm.requests``."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, arm: FakeArm, ctx: ssl.SSLContext, port: int) -> None:
        self.arm, self.ctx = arm, ctx
        super().__init__(("127.0.0.1", port), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """TLS handshake in the worker thread, not in the accept loop."""
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        with tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore client disconnects."""


def main(argv: list[str] | None = None) -> int:
    """Run the fake until SIGINT/SIGTERM; prints ``ready URL CERT`` when listening."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", type=Path, required=True, help="where cert.pem/key.pem live")
    parser.add_argument("--blob-account", required=True)
    parser.add_argument("--blob-key", required=True)
    parser.add_argument("--blob-ca", type=Path)
    parser.add_argument("--resource-group", action="append", dest="groups")
    parser.add_argument("--location", default="westeurope")
    parser.add_argument("--app", action="append", default=[], help="TENANT:CLIENT_ID:SECRET")
    args = parser.parse_args(argv)
    arm = FakeArm(
        args.blob_account, args.blob_key, args.blob_ca, args.dir,
        args.groups or ["standby-dr"], args.location, port=args.port,
    )  # fmt: skip
    for app in args.app:
        arm.add_app(*app.split(":", 2))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with arm:
        print(f"ready {arm.url} {arm.cert}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
