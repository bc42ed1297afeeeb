"""The s3:// vault store against the AWS double (moto over HTTPS, the site's pinned CA)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from standby.core.config import get_site
from standby.core.errors import AuthError, ConfigError, NotFound, TransientError
from standby.core.vault.store import open_store
from standby.providers.aws.vaultstore import S3Store, open_s3
from support.aws import REGION, AwsEnv
from support.labenv import write_site
from support.vaultcheck import vault_round_trip


def _bucket(awsenv: AwsEnv) -> str:
    name = f"vault-{uuid.uuid4().hex[:12]}"
    awsenv.client("s3").create_bucket(Bucket=name)
    return name


def _open(awsenv: AwsEnv, home: Path, url: str, **extra: object) -> S3Store:
    write_site(home, "aws-vault", awsenv.site_toml(**extra))
    store = open_store(url, get_site("aws-vault", home))
    assert isinstance(store, S3Store)
    return store


@pytest.fixture
def s3store(awsenv: AwsEnv, tmp_path: Path) -> Iterator[S3Store]:
    store = _open(awsenv, tmp_path, f"s3://{_bucket(awsenv)}/some/prefix/")
    try:
        yield store
    finally:
        store.close()


def test_s3_store_objects(s3store: S3Store, awsenv: AwsEnv) -> None:
    assert s3store.url.endswith("/some/prefix")
    assert s3store.list("") == []
    s3store.put("packs/ab/p1", b"0123456789")
    s3store.put("packs/cd/p2", memoryview(b"xyz"))
    s3store.put("vault.json", bytearray(b"{}"))
    assert s3store.get("packs/ab/p1") == b"0123456789"
    assert s3store.get_range("packs/ab/p1", 3, 4) == b"3456"
    assert s3store.get_range("packs/ab/p1", 8, 10) == b"89"
    assert s3store.get_range("packs/ab/p1", 0, 0) == b""
    assert s3store.size("packs/cd/p2") == 3
    assert s3store.list("packs/") == ["packs/ab/p1", "packs/cd/p2"]
    assert s3store.list("") == ["packs/ab/p1", "packs/cd/p2", "vault.json"]
    keys = awsenv.client("s3").list_objects_v2(Bucket=s3store.bucket)["Contents"]
    assert sorted(k["Key"] for k in keys)[0] == "some/prefix/packs/ab/p1"
    s3store.delete("packs/ab/p1")
    s3store.delete("packs/ab/p1")  # missing is fine
    assert s3store.list("packs/") == ["packs/cd/p2"]
    for call in (s3store.get, s3store.size, lambda n: s3store.get_range(n, 0, 4)):
        with pytest.raises(NotFound, match=r"s3://.*/some/prefix: packs/ab/p1 not found"):
            call("packs/ab/p1")


def test_s3_store_vault_round_trip(s3store: S3Store) -> None:
    vault_round_trip(s3store)


def test_s3_store_urls_and_errors(awsenv: AwsEnv, tmp_path: Path) -> None:
    for bad in ("s3://", "s3://Bad_Bucket/x", "s3://b/x", "s3://bucket/x?y=1"):
        with pytest.raises(ConfigError):
            open_s3(bad, None)
    missing = _open(awsenv, tmp_path, "s3://no-such-bucket-here/v")
    with pytest.raises(NotFound, match="bucket 'no-such-bucket-here' does not exist"):
        missing.list("")
    missing.close()
    write_site(tmp_path, "refused", awsenv.site_toml(access_key_id="env:SB_TEST_OTHER_KEY"))
    os.environ["SB_TEST_OTHER_KEY"] = "not-the-doubles-key"
    try:
        refused = open_store(f"s3://{_bucket(awsenv)}", get_site("refused", tmp_path))
        with pytest.raises(AuthError) as err:
            refused.get("vault.json")
        assert "SB_TEST_OTHER_KEY" not in str(err.value)
        assert "not-the-doubles-key" not in str(err.value)
        refused.close()
    finally:
        del os.environ["SB_TEST_OTHER_KEY"]


def test_s3_store_without_site(awsenv: AwsEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """No site: boto3's defaults (here the environment) find the endpoint and keys."""
    from doubles.moto_proc import ACCESS_KEY, SECRET_KEY

    bucket = _bucket(awsenv)
    for k, v in {
        "AWS_ENDPOINT_URL": awsenv.moto.url,
        "AWS_CA_BUNDLE": str(awsenv.moto.cert),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(k, v)
    store = open_store(f"s3://{bucket}")
    store.put("a", b"1")
    assert awsenv.client("s3").get_object(Bucket=bucket, Key="a")["Body"].read() == b"1"
    store.close()


def test_s3_store_paused_server_is_transient(awsenv: AwsEnv, tmp_path: Path) -> None:
    store = _open(awsenv, tmp_path, f"s3://{_bucket(awsenv)}", connect_timeout=1, read_timeout=1)
    store.put("a", b"1")
    awsenv.moto.pause()
    try:
        with pytest.raises(TransientError, match=r"s3://vault-\w+: read a"):
            store.get("a")
    finally:
        awsenv.moto.resume()
    assert store.get("a") == b"1"
    store.close()
