"""The `azure://CONTAINER/PREFIX` vault store: block blobs in a container of the storage
account an Azure site names (its blob endpoint, credential and pinned CA)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

from standby.core.config import Site
from standby.core.errors import ConfigError, NotFound
from standby.core.vault.store import Store
from standby.providers.azure.conn import (
    CONTAINER_RE,
    AzureClients,
    AzureOptions,
    azure_errors,
    error_code,
)

_T = TypeVar("_T")


def parse_url(url: str) -> tuple[str, str]:
    """Container and blob name prefix (`''` or ending in `/`) of `azure://CONTAINER/PREFIX`."""
    parsed = urlparse(url)
    if parsed.scheme != "azure" or not CONTAINER_RE.fullmatch(parsed.netloc):
        raise ConfigError(
            f"vault store '{url}': expected azure://CONTAINER/PREFIX with a valid container"
        )
    if parsed.query or parsed.fragment:
        raise ConfigError(f"vault store '{url}': an azure:// store takes no query or fragment")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


class BlobStore(Store):
    """One container (under a name prefix): each object a block blob, committed whole; the
    container is made on the first put that finds it missing."""

    def __init__(self, url: str, clients: AzureClients) -> None:
        self.container_name, self.prefix = parse_url(url)
        self.url = f"azure://{self.container_name}/{self.prefix}".rstrip("/")
        self.clients = clients
        self.container = clients.service.get_container_client(self.container_name)

    def _call(self, verb: str, name: str, fn: Callable[[], _T]) -> _T:
        """Run `fn` with SDK errors translated; a missing blob or container is NotFound."""
        try:
            with azure_errors(f"vault store {self.url}: {verb} {name}"):
                return fn()
        except NotFound as exc:
            raise NotFound(f"vault store {self.url}: {name} not found") from exc.__cause__

    def _blob(self, name: str) -> Any:
        return self.container.get_blob_client(self.prefix + name)

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

        body = data if isinstance(data, bytes) else bytes(data)

        def upload() -> None:
            blob = self._blob(name)
            try:
                blob.upload_blob(body, overwrite=True, length=len(body))
            except ResourceNotFoundError as exc:
                if error_code(exc) != "ContainerNotFound":
                    raise
                try:
                    self.container.create_container()
                except ResourceExistsError:
                    pass
                blob.upload_blob(body, overwrite=True, length=len(body))

        self._call("write", name, upload)

    def get(self, name: str) -> bytes:
        return self._call("read", name, lambda: bytes(self._blob(name).download_blob().readall()))

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        from azure.core.exceptions import HttpResponseError

        if length <= 0:
            self.size(name)  # NotFound when missing, as a read would be
            return b""

        def fetch() -> bytes:
            try:
                got = self._blob(name).download_blob(offset=offset, length=length)
            except HttpResponseError as exc:
                if exc.status_code == 416:  # at or past the end: nothing there
                    return b""
                raise
            return bytes(got.readall())

        return self._call("read", name, fetch)

    def list(self, prefix: str) -> list[str]:
        def names() -> list[str]:
            cut = len(self.prefix)
            blobs = self.container.list_blobs(name_starts_with=self.prefix + prefix)
            return sorted(str(b.name)[cut:] for b in blobs)

        try:
            return self._call("list", prefix or "/", names)
        except NotFound:  # no container yet: an empty store
            return []

    def delete(self, name: str) -> None:
        try:
            self._call("delete", name, lambda: self._blob(name).delete_blob())
        except NotFound:
            pass

    def size(self, name: str) -> int:
        props = self._call("stat", name, lambda: self._blob(name).get_blob_properties())
        return int(props.size)

    def close(self) -> None:
        self.clients.close()


def open_azure(url: str, site: Site | None) -> BlobStore:
    """The `standby.vault_stores` factory of `azure://`: the account of an azure site."""
    parse_url(url)
    if site is None or site.plugin != "azure":
        which = f"site '{site.name}' is a '{site.plugin}' site" if site else "no site is given"
        raise ConfigError(
            f"vault store {url}: {which}; an azure:// store needs an azure site "
            "(its storage account, credential and CA)"
        )
    return BlobStore(url, AzureClients(site.options(AzureOptions)))
