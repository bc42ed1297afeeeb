"""The `s3://BUCKET/PREFIX` vault store: objects in an S3 bucket (or an S3-compatible one),
reached with the clients of an AWS site (its endpoint, pinned CA, region and keys)."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

from standby.core.config import Site
from standby.core.errors import ConfigError, NotFound
from standby.core.vault.store import Store
from standby.providers.aws.conn import AwsClients, AwsOptions, aws_errors, error_code

_T = TypeVar("_T")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CONFIG: dict[str, Any] = {
    "retries": {"mode": "standard", "max_attempts": 3},  # the vault retries on top
    # No checksum trailers (aws-chunked uploads), which many S3-compatible stores refuse: each
    # put carries Content-MD5 instead (S3 refuses a body that does not match it), and the
    # vault authenticates every object it reads.
    "request_checksum_calculation": "when_required",
}


def parse_url(url: str) -> tuple[str, str]:
    """Bucket and key prefix (`''` or ending in `/`) of `s3://BUCKET/PREFIX`."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not _BUCKET.fullmatch(parsed.netloc) or ".." in parsed.netloc:
        raise ConfigError(f"vault store '{url}': expected s3://BUCKET/PREFIX with a valid bucket")
    if parsed.query or parsed.fragment:
        raise ConfigError(f"vault store '{url}': an s3:// store takes no query or fragment")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


class S3Store(Store):
    """One bucket (under a key prefix): a put is a single PutObject, seen whole or not at all."""

    def __init__(self, url: str, client: Any) -> None:
        self.bucket, self.prefix = parse_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = client

    def _call(self, verb: str, name: str, fn: Callable[[], _T]) -> _T:
        """Run `fn` with botocore errors translated; a missing object or bucket is NotFound."""
        try:
            with aws_errors(f"vault store {self.url}: {verb} {name}"):
                return fn()
        except NotFound as exc:
            if error_code(exc.__cause__ or exc) == "NoSuchBucket":
                raise NotFound(
                    f"vault store {self.url}: bucket '{self.bucket}' does not exist"
                ) from exc.__cause__
            raise NotFound(f"vault store {self.url}: {name} not found") from exc.__cause__

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        body = data if isinstance(data, bytes) else bytes(data)
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        self._call(
            "write",
            name,
            lambda: self.client.put_object(
                Bucket=self.bucket, Key=self.prefix + name, Body=body, ContentMD5=md5
            ),
        )

    def get(self, name: str) -> bytes:
        def fetch() -> bytes:
            got = self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)
            with got["Body"] as body:
                return bytes(body.read())

        return self._call("read", name, fetch)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        if length <= 0:
            self.size(name)  # NotFound when missing, as a read would be
            return b""
        key, rng = self.prefix + name, f"bytes={offset}-{offset + length - 1}"

        def fetch() -> bytes:
            from botocore.exceptions import ClientError

            try:
                got = self.client.get_object(Bucket=self.bucket, Key=key, Range=rng)
            except ClientError as exc:
                if error_code(exc) == "InvalidRange":  # at or past the end: nothing there
                    return b""
                raise
            with got["Body"] as body:
                return bytes(body.read())

        return self._call("read", name, fetch)

    def list(self, prefix: str) -> list[str]:
        def names() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            cut = len(self.prefix)
            return sorted(o["Key"][cut:] for page in pages for o in page.get("Contents", []))

        return self._call("list", prefix or "/", names)

    def delete(self, name: str) -> None:
        self._call(
            "delete",
            name,
            lambda: self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name),
        )

    def size(self, name: str) -> int:
        got = self._call(
            "stat",
            name,
            lambda: self.client.head_object(Bucket=self.bucket, Key=self.prefix + name),
        )
        return int(got["ContentLength"])

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing is best effort
            pass


def open_s3(url: str, site: Site | None) -> S3Store:
    """The `standby.vault_stores` factory of `s3://`: the site's clients, else boto3's defaults
    (environment, shared config, instance role)."""
    parse_url(url)
    if site is None:
        import boto3
        from botocore.config import Config

        with aws_errors(f"vault store {url}"):
            client = boto3.session.Session().client("s3", config=Config(**_CONFIG))
        return S3Store(url, client)
    if site.plugin != "aws":
        raise ConfigError(
            f"vault store {url}: site '{site.name}' is a '{site.plugin}' site, "
            "an s3:// store needs an aws one"
        )
    clients = AwsClients(site.options(AwsOptions))
    return S3Store(url, clients.client("s3", **_CONFIG))
