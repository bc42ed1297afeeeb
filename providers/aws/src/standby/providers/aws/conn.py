"""AWS site options, boto3 clients and the translation of botocore errors into standby's tree."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar
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

_T = TypeVar("_T")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkRef(_Section):
    """Where failed-over instances go: a subnet and its security groups."""

    subnet_id: str
    security_group_ids: list[str] = Field(default_factory=list)


class TestNetwork(_Section):
    """The isolated VPC of drills: made by standby when `vpc_id` is not given."""

    vpc_id: str | None = None
    subnet_id: str | None = None
    cidr: str = "10.250.0.0/24"


class AwsOptions(SiteOptions):
    """Keys of a `plugin = "aws"` site file."""

    region: str
    profile: str | None = None
    access_key_id: SecretRef | None = None
    secret_access_key: SecretRef | None = None
    session_token: SecretRef | None = None
    role_arn: str | None = None
    endpoint_url: str | None = None
    ca_file: str | None = None
    network: NetworkRef | None = None
    test_network: TestNetwork = Field(default_factory=TestNetwork)
    instance_type: str | None = None
    prices: str | None = None
    max_parallel_writes: int = Field(default=16, ge=1, le=64)
    max_parallel_reads: int = Field(default=16, ge=1, le=64)
    operation_timeout: int = Field(default=1800, ge=1)
    connect_timeout: float = Field(default=10, gt=0)
    read_timeout: float = Field(default=60, gt=0)
    poll_seconds: float = Field(default=2.0, gt=0)

    @field_validator("endpoint_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlparse(value)
        if parsed.scheme not in ("https", "http") or not parsed.netloc:
            raise ValueError(f"'{value}' is not an http(s) URL")
        return value.rstrip("/")

    def verify(self) -> str | bool:
        """TLS verification: the pinned CA file when given, else the system store."""
        if self.ca_file:
            path = Path(self.ca_file).expanduser()
            if not path.is_file():
                raise ConfigError(f"key 'ca_file': {path} does not exist")
            return str(path)
        return True


_AUTH_CODES = {
    "AuthFailure",
    "UnauthorizedOperation",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "AccessDeniedException",
    "AccessDenied",
    "ExpiredToken",
    "UnrecognizedClientException",
}
_TRANSIENT_CODES = {
    "RequestLimitExceeded",
    "ThrottlingException",
    "Throttling",
    "RequestThrottledException",
    "ConcurrentLimitExceededException",
    "InternalError",
    "InternalServerException",
    "InternalFailure",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "InsufficientInstanceCapacity",
    "Unavailable",
}
_NOT_FOUND_SUFFIX = (".NotFound", ".Malformed", "NotFoundException")


class RetryCounter:
    """How many times botocore retried, per error code (reported in cycle and failover notes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, code: str) -> None:
        with self._lock:
            self.counts[code] = self.counts.get(code, 0) + 1

    def take(self) -> dict[str, int]:
        """The counts so far, reset."""
        with self._lock:
            out, self.counts = self.counts, {}
        return out

    def note(self, who: str) -> str | None:
        """`AWS target: retried with backoff: RequestThrottledException x3` (None: no retries);
        the counts are reset."""
        counts = self.take()
        if not counts:
            return None
        told = ", ".join(f"{code} x{n}" for code, n in sorted(counts.items()))
        return f"{who}: calls retried with backoff: {told}"


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError ('' when there is none)."""
    resp = getattr(exc, "response", None) or {}
    return str((resp.get("Error") or {}).get("Code") or "")


def translate(exc: BaseException, what: str) -> StandbyError:
    """Map a botocore exception to the error tree, naming what was being done."""
    from botocore import exceptions as bc

    if isinstance(exc, bc.NoCredentialsError | bc.PartialCredentialsError):
        return AuthError(f"{what}: no AWS credentials ({exc})")
    if isinstance(exc, bc.ProfileNotFound):
        return AuthError(f"{what}: {exc}")
    if isinstance(exc, bc.SSLError):
        if "certificate" in str(exc).lower() or "hostname" in str(exc).lower():
            return AuthError(f"{what}: TLS verification of the AWS endpoint failed")
        return TransientError(f"{what}: TLS connection to the AWS endpoint broke")
    if isinstance(exc, bc.EndpointConnectionError | bc.ConnectionClosedError | bc.ReadTimeoutError):
        return TransientError(f"{what}: AWS endpoint unreachable ({type(exc).__name__})")
    if isinstance(exc, bc.ConnectTimeoutError):
        return TransientError(f"{what}: AWS endpoint did not answer")
    code = error_code(exc)
    resp = getattr(exc, "response", None) or {}
    status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    msg = str((resp.get("Error") or {}).get("Message") or exc).splitlines()[0][:300]
    detail = f"{what}: {code + ': ' if code else ''}{msg}"
    if code in _AUTH_CODES or status in (401, 403):
        return AuthError(f"{what}: AWS refused the credentials ({code or status})")
    if code.endswith(_NOT_FOUND_SUFFIX) or status == 404:
        return NotFound(detail)
    if code in _TRANSIENT_CODES or status in (429, 500, 502, 503, 504):
        return TransientError(detail)
    if isinstance(exc, bc.BotoCoreError) and not isinstance(exc, bc.ClientError):
        return TransientError(f"{what}: {exc}")
    return PluginError(detail)


@contextmanager
def aws_errors(what: str) -> Iterator[None]:
    """Translate botocore exceptions raised inside the block."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except StandbyError:
        raise
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, what) from exc
    except OSError as exc:
        raise TransientError(f"{what}: {exc}") from exc


def call(what: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run one SDK call with error translation."""
    with aws_errors(what):
        return fn(*args, **kwargs)


class AwsClients:
    """The site's boto3 session and clients (thread-safe once built; built under a lock)."""

    def __init__(self, opts: AwsOptions) -> None:
        self.opts = opts
        self.retries = RetryCounter()
        self._lock = threading.Lock()

    @cached_property
    def verify(self) -> str | bool:
        return self.opts.verify()

    def _base_session(self) -> Any:
        import boto3

        o = self.opts
        if o.profile and o.access_key_id:
            raise ConfigError("give either 'profile' or 'access_key_id', not both")
        if o.access_key_id or o.secret_access_key:
            if not (o.access_key_id and o.secret_access_key):
                missing = "secret_access_key" if o.access_key_id else "access_key_id"
                raise ConfigError(f"key '{missing}' is missing (both keys are needed)")
            token = o.secret("session_token") if o.session_token else None
            return boto3.session.Session(
                aws_access_key_id=o.secret("access_key_id"),
                aws_secret_access_key=o.secret("secret_access_key"),
                aws_session_token=token,
                region_name=o.region,
            )
        with aws_errors(f"AWS profile '{o.profile}'"):
            return boto3.session.Session(profile_name=o.profile, region_name=o.region)

    @cached_property
    def session(self) -> Any:
        """The session the clients use: the site's keys, or the role they assume."""
        base = self._base_session()
        if not self.opts.role_arn:
            return base
        import boto3

        sts = base.client("sts", **self._kwargs())
        got = call(
            f"assume role {self.opts.role_arn}",
            sts.assume_role,
            RoleArn=self.opts.role_arn,
            RoleSessionName="standby",
        )
        cred = got["Credentials"]
        return boto3.session.Session(
            aws_access_key_id=cred["AccessKeyId"],
            aws_secret_access_key=cred["SecretAccessKey"],
            aws_session_token=cred["SessionToken"],
            region_name=self.opts.region,
        )

    def _kwargs(self, **config: Any) -> dict[str, Any]:
        from botocore.config import Config

        cfg = Config(
            retries={"mode": "standard", "max_attempts": 6},
            max_pool_connections=max(self.opts.max_parallel_writes, self.opts.max_parallel_reads)
            + 8,
            connect_timeout=self.opts.connect_timeout,
            read_timeout=self.opts.read_timeout,
            tcp_keepalive=True,
        ).merge(Config(**config))
        return {"endpoint_url": self.opts.endpoint_url, "verify": self.verify, "config": cfg}

    def client(self, service: str, **config: Any) -> Any:
        """A new client of the site's session for `service` (its endpoint, pinned CA, timeouts),
        `config` overriding botocore Config options; the caller closes it."""
        with self._lock:
            client = self.session.client(service, **self._kwargs(**config))
        client.meta.events.register("needs-retry.*", self._on_retry)
        return client

    def _on_retry(self, response: Any = None, attempts: int = 0, **_: Any) -> None:
        """botocore's needs-retry hook: count the retried error codes (never decides)."""
        if response is None:
            return
        _, parsed = response
        code = ((parsed or {}).get("Error") or {}).get("Code")
        if code in _TRANSIENT_CODES:
            self.retries.add(str(code))

    @cached_property
    def ec2(self) -> Any:
        return self.client("ec2")

    @cached_property
    def ebs(self) -> Any:
        return self.client("ebs")

    def close(self) -> None:
        for name in ("ec2", "ebs"):
            client = self.__dict__.pop(name, None)
            if client is not None:
                try:
                    client.close()
                except Exception:  # closing is best effort
                    pass


class AwsPlugin:
    """What the AWS source and target share: the site's options and clients."""

    site: Any

    @classmethod
    def unavailable_reason(cls) -> str | None:
        import importlib.util

        for mod in ("boto3", "botocore"):
            if importlib.util.find_spec(mod) is None:
                return f"Python package {mod} is not installed"
        return None

    @cached_property
    def opts(self) -> AwsOptions:
        return self.site.options(AwsOptions)  # type: ignore[no-any-return]

    @cached_property
    def clients(self) -> AwsClients:
        return AwsClients(self.opts)

    def connect(self) -> None:
        _ = self.clients.verify
        _ = self.clients.session

    def close(self) -> None:
        if "clients" in self.__dict__:
            self.clients.close()
            del self.__dict__["clients"]

    def check_credentials(self) -> str:
        """The account the credentials belong to (an AuthError when they are refused)."""
        ec2 = self.clients.ec2
        call("check AWS credentials", ec2.describe_regions, RegionNames=[self.opts.region])
        return self.opts.region


def paged(what: str, fn: Callable[..., Any], key: str, **kwargs: Any) -> Iterator[Any]:
    """Every item of a paged EC2/EBS list call (`NextToken`)."""
    token: str | None = None
    while True:
        args = dict(kwargs)
        if token:
            args["NextToken"] = token
        page = call(what, fn, **args)
        yield from page.get(key, [])
        token = page.get("NextToken")
        if not token:
            return


def tags_of(item: Any) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in item.get("Tags", []) or []}
