"""The azure:// vault store against Azurite (HTTPS, the site's pinned CA, the account key)."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from standby.core.config import get_site
from standby.core.errors import AuthError, ConfigError, NotFound, TransientError
from standby.core.vault.store import open_store
from standby.providers.azure.vaultstore import BlobStore, open_azure
from support.azure import AzureEnv
from support.labenv import write_site
from support.vaultcheck import vault_round_trip


def _open(azenv: AzureEnv, home: Path, url: str, **extra: object) -> BlobStore:
    write_site(home, "az-vault", azenv.site_toml("standby", **extra))
    store = open_store(url, get_site("az-vault", home))
    assert isinstance(store, BlobStore)
    return store


@pytest.fixture
def blobstore(azenv: AzureEnv, tmp_path: Path) -> Iterator[BlobStore]:
    store = _open(azenv, tmp_path, f"azure://vault-{uuid.uuid4().hex[:12]}/some/prefix/")
    try:
        yield store
    finally:
        store.close()


def test_blob_store_objects(blobstore: BlobStore) -> None:
    assert blobstore.url.endswith("/some/prefix")
    assert blobstore.list("") == []  # no container yet
    blobstore.delete("nothing")
    blobstore.put("packs/ab/p1", b"0123456789")  # makes the container
    blobstore.put("packs/cd/p2", memoryview(b"xyz"))
    blobstore.put("vault.json", bytearray(b"{}"))
    assert blobstore.get("packs/ab/p1") == b"0123456789"
    assert blobstore.get_range("packs/ab/p1", 3, 4) == b"3456"
    assert blobstore.get_range("packs/ab/p1", 8, 10) == b"89"
    assert blobstore.get_range("packs/ab/p1", 0, 0) == b""
    assert blobstore.size("packs/cd/p2") == 3
    assert blobstore.list("packs/") == ["packs/ab/p1", "packs/cd/p2"]
    assert blobstore.list("") == ["packs/ab/p1", "packs/cd/p2", "vault.json"]
    names = [b.name for b in blobstore.container.list_blobs()]
    assert "some/prefix/vault.json" in names
    assert blobstore.container.get_blob_client(names[0]).get_blob_properties().blob_type == (
        "BlockBlob"
    )
    blobstore.delete("packs/ab/p1")
    blobstore.delete("packs/ab/p1")  # missing is fine
    assert blobstore.list("packs/") == ["packs/cd/p2"]
    for call in (blobstore.get, blobstore.size, lambda n: blobstore.get_range(n, 0, 4)):
        with pytest.raises(NotFound, match=r"azure://.*/some/prefix: packs/ab/p1 not found"):
            call("packs/ab/p1")


def test_blob_store_large_object(blobstore: BlobStore) -> None:
    """Bigger than one put: staged blocks, committed whole."""
    data = os.urandom(9 << 20)
    blobstore.put("packs/big", data)
    assert blobstore.size("packs/big") == len(data)
    assert blobstore.get_range("packs/big", 5 << 20, 100) == data[5 << 20 : (5 << 20) + 100]
    assert blobstore.get("packs/big") == data


def test_blob_store_vault_round_trip(blobstore: BlobStore) -> None:
    vault_round_trip(blobstore)


def test_blob_store_urls_and_errors(
    azenv: AzureEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for bad in ("azure://", "azure://Bad_Name/x", "azure://ab/x", "azure://box/x#y"):
        with pytest.raises(ConfigError):
            open_azure(bad, None)
    with pytest.raises(ConfigError, match="needs an azure site"):
        open_azure("azure://box/x", None)
    wrong = base64.b64encode(b"not the account key").decode()
    monkeypatch.setenv("SB_TEST_OTHER_AZ_KEY", wrong)
    refused = _open(azenv, tmp_path, "azure://box/x", storage_key="env:SB_TEST_OTHER_AZ_KEY")
    with pytest.raises(AuthError) as err:
        refused.put("vault.json", b"{}")
    assert wrong not in str(err.value)
    refused.close()


def test_blob_store_stopped_azurite_is_transient(blobstore: BlobStore, azenv: AzureEnv) -> None:
    blobstore.put("a", b"1")
    azenv.azurite.stop()
    try:
        with pytest.raises(TransientError, match=r"azure://vault-\w+/some/prefix: read a"):
            blobstore.get("a")
    finally:
        azenv.restart_azurite()
    assert blobstore.get("a") == b"1"
