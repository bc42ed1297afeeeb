"""Azure site options, SDK clients and the translation of SDK errors into standby's tree."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from standby.core.config import SecretRef, SiteOptions
from standby.core.errors import (
    AuthError,
    ConfigError,
    NotFound,
    PluginError,
    StandbyError,
    TransientError,
)

PUBLIC_ARM = "https://management.azure.com"
CONTAINER_RE = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
"""A valid blob container name."""
_T = TypeVar("_T")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Credential(_Section):
    """How standby authenticates to ARM (and to storage when no key is given).

    `client_secret`: a service principal; `managed_identity`: the host's identity;
    `default`: azure-identity's DefaultAzureCredential chain; `token`: a bearer token taken as
    is (short-lived, e.g. from `az account get-access-token`).
    """

    kind: Literal["client_secret", "managed_identity", "default", "token"] = "client_secret"
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: SecretRef | None = None
    authority: str | None = None
    token: SecretRef | None = None


class NetworkRef(_Section):
    """A virtual network and subnet in the site's resource group."""

    vnet: str
    subnet: str
    address_prefix: str = "10.250.0.0/24"


class AzureOptions(SiteOptions):
    """Keys of a `plugin = "azure"` site file."""

    subscription_id: str
    resource_group: str
    location: str
    blob_endpoint: str
    container: str = "standby"
    storage_account_id: str | None = None
    storage_key: SecretRef | None = None
    credential: Credential = Field(default_factory=Credential)
    arm_endpoint: str = PUBLIC_ARM
    ca_file: str | None = None
    network: NetworkRef | None = None
    test_network: NetworkRef = Field(
        default_factory=lambda: NetworkRef(vnet="standby-test-isolated", subnet="isolated")
    )
    vault: str | None = None
    """A vault whose key seals the point manifests kept beside the replica blobs."""
    vm_size: str | None = None
    disk_sku: Literal["Standard_LRS", "StandardSSD_LRS", "Premium_LRS"] = "Standard_LRS"
    prices: str | None = None
    max_parallel_writes: int = Field(default=8, ge=1, le=64)
    operation_timeout: int = Field(default=1800, ge=1)

    @field_validator("blob_endpoint", "arm_endpoint")
    @classmethod
    def _https(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("https", "http") or not parsed.netloc:
            raise ValueError(f"'{value}' is not an http(s) URL")
        return value.rstrip("/")

    @field_validator("container")
    @classmethod
    def _container(cls, value: str) -> str:
        if not CONTAINER_RE.fullmatch(value):
            raise ValueError(f"'{value}' is not a valid blob container name")
        return value

    @property
    def account_name(self) -> str:
        """The storage account: the first label of the host, or the path (Azurite style)."""
        parsed = urlparse(self.blob_endpoint)
        host = parsed.hostname or ""
        if parsed.path.strip("/"):
            return parsed.path.strip("/").split("/")[0]
        return host.split(".")[0]

    def account_id(self) -> str:
        return self.storage_account_id or (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Storage/storageAccounts/{self.account_name}"
        )

    def verify(self) -> str | bool:
        """TLS verification: the pinned CA file when given, else the system store."""
        if self.ca_file:
            path = Path(self.ca_file).expanduser()
            if not path.is_file():
                raise ConfigError(f"key 'ca_file': {path} does not exist")
            return str(path)
        return True


class StaticToken:
    """A TokenCredential around a bearer token the operator obtained elsewhere."""

    def __init__(self, token: str) -> None:
        self._token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken(self._token, 2**31 - 1)


def make_credential(opts: AzureOptions) -> Any:
    """The azure-identity credential the site asks for; secrets are resolved here only."""
    c = opts.credential
    verify = opts.verify()
    if c.kind == "token":
        if not c.token:
            raise ConfigError("credential kind 'token' needs key 'credential.token'")
        return StaticToken(opts.secret("credential.token"))
    from azure import identity

    transport: dict[str, Any] = {"connection_verify": verify} if verify is not True else {}
    if c.kind == "client_secret":
        missing = [k for k in ("tenant_id", "client_id", "client_secret") if not getattr(c, k)]
        if missing:
            raise ConfigError(
                f"credential kind 'client_secret' needs key 'credential.{missing[0]}'"
            )
        assert c.tenant_id and c.client_id and c.client_secret
        extra: dict[str, Any] = dict(transport)
        if c.authority:
            extra.update(authority=c.authority, disable_instance_discovery=True)
        return identity.ClientSecretCredential(
            c.tenant_id, c.client_id, opts.secret("credential.client_secret"), **extra
        )
    if c.kind == "managed_identity":
        return identity.ManagedIdentityCredential(client_id=c.client_id, **transport)
    return identity.DefaultAzureCredential(**transport)


_AUTH_CODES = {"AuthenticationFailed", "AuthorizationFailed", "InvalidAuthenticationToken"}
_TRANSIENT_CODES = {
    "AllocationFailed",
    "ZonalAllocationFailed",
    "OverconstrainedAllocationRequest",
    "TooManyRequests",
    "ServerBusy",
    "InternalServerError",
    "OperationTimedOut",
    "RetryableError",
}


def error_code(exc: BaseException) -> str:
    """The Azure error code of an SDK exception ('' when there is none)."""
    code = getattr(exc, "error_code", None)
    if not code:
        err = getattr(exc, "error", None)
        code = getattr(err, "code", None)
    return str(code or "")


def _message(exc: BaseException) -> str:
    err = getattr(exc, "error", None)
    msg = getattr(err, "message", None) or getattr(exc, "message", None) or str(exc)
    return str(msg).splitlines()[0][:300]


def translate(exc: BaseException, what: str) -> StandbyError:
    """Map an azure-core exception to the error tree, naming what was being done."""
    from azure.core import exceptions as az

    code = error_code(exc)
    status = getattr(exc, "status_code", None)
    detail = f"{what}: {code + ': ' if code else ''}{_message(exc)}"
    if isinstance(exc, az.ClientAuthenticationError) or code in _AUTH_CODES or status in (401, 403):
        return AuthError(f"{what}: authentication to Azure failed ({code or status})")
    if isinstance(exc, az.ResourceNotFoundError) or status == 404:
        return NotFound(detail)
    if isinstance(exc, az.ServiceRequestError | az.ServiceResponseError):
        return TransientError(f"{what}: Azure endpoint unreachable ({type(exc).__name__})")
    if code in _TRANSIENT_CODES or status in (429, 500, 502, 503, 504):
        return TransientError(detail)
    return PluginError(detail)


@contextmanager
def azure_errors(what: str) -> Iterator[None]:
    """Translate azure-core exceptions raised inside the block."""
    from azure.core.exceptions import AzureError

    try:
        yield
    except StandbyError:
        raise
    except AzureError as exc:
        raise translate(exc, what) from exc
    except OSError as exc:
        raise TransientError(f"{what}: {exc}") from exc


def call(what: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run one SDK call with error translation."""
    with azure_errors(what):
        return fn(*args, **kwargs)


class AzurePlugin:
    """What the Azure source and target share: the site's options and SDK clients."""

    site: Any

    @classmethod
    def unavailable_reason(cls) -> str | None:
        import importlib.util

        for mod in ("azure.storage.blob", "azure.identity", "azure.mgmt.compute",
                    "azure.mgmt.network"):  # fmt: skip
            try:
                if importlib.util.find_spec(mod) is None:
                    return f"Python package for {mod} is not installed"
            except ModuleNotFoundError:
                return f"Python package for {mod} is not installed"
        return None

    @cached_property
    def opts(self) -> AzureOptions:
        return self.site.options(AzureOptions)  # type: ignore[no-any-return]

    @cached_property
    def clients(self) -> AzureClients:
        return AzureClients(self.opts)

    def connect(self) -> None:
        _ = self.opts
        self.clients.verify  # noqa: B018 (checks ca_file early)

    def close(self) -> None:
        if "clients" in self.__dict__:
            self.clients.close()
            del self.__dict__["clients"]


class AzureClients:
    """Lazily built SDK clients of one site, sharing transport settings."""

    def __init__(self, opts: AzureOptions) -> None:
        self.opts = opts

    @cached_property
    def verify(self) -> str | bool:
        return self.opts.verify()

    @cached_property
    def credential(self) -> Any:
        return make_credential(self.opts)

    def _common(self) -> dict[str, Any]:
        return {"connection_verify": self.verify, "retry_total": 3}

    @cached_property
    def service(self) -> Any:
        """The storage account's client (account key when given, else the AAD credential)."""
        from azure.storage.blob import BlobServiceClient

        cred: Any = self.credential
        if self.opts.storage_key:
            key = self.opts.secret("storage_key")
            cred = {"account_name": self.opts.account_name, "account_key": key}
        return BlobServiceClient(
            self.opts.blob_endpoint,
            credential=cred,
            max_single_put_size=4 << 20,
            connection_timeout=20,
            read_timeout=120,
            initial_backoff=0.5,
            increment_base=2,
            random_jitter_range=1,
            connection_verify=self.verify,
            retry_total=1,  # the engine retries whole writes (with backoff) on top of this
        )

    @cached_property
    def container(self) -> Any:
        """The replicas' container client."""
        return self.service.get_container_client(self.opts.container)

    @cached_property
    def compute(self) -> Any:
        from azure.mgmt.compute import ComputeManagementClient

        return ComputeManagementClient(
            self.credential,
            self.opts.subscription_id,
            base_url=self.opts.arm_endpoint,
            credential_scopes=[self._scope()],
            polling_interval=self._poll(),
            **self._common(),
        )

    @cached_property
    def network(self) -> Any:
        from azure.mgmt.network import NetworkManagementClient

        return NetworkManagementClient(
            self.credential,
            self.opts.subscription_id,
            base_url=self.opts.arm_endpoint,
            credential_scopes=[self._scope()],
            polling_interval=self._poll(),
            **self._common(),
        )

    def _scope(self) -> str:
        return PUBLIC_ARM + "/.default"

    def _poll(self) -> float:
        return 0.2 if self.opts.arm_endpoint != PUBLIC_ARM else 5.0

    def close(self) -> None:
        for name in ("container", "service", "compute", "network"):
            client = self.__dict__.pop(name, None)
            if client is not None:
                try:
                    client.close()
                except Exception:  # closing is best effort
                    pass
