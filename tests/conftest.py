"""Shared fixtures: embedded libvirt hosts, sites and an engine, all under a short temp dir."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.aws import AwsEnv, aws_double
from support.azure import AzureEnv, azure_doubles
from support.labenv import Lab, kill_qemu, write_site


@pytest.fixture(scope="module")
def labenv() -> Iterator[Lab]:
    """A fresh pair of embedded hosts per test module (socket paths must stay short)."""
    base = Path(tempfile.mkdtemp(prefix="sb", dir="/tmp"))
    home = base / "home"
    env = Lab(
        base=base,
        home=home,
        src_uri=f"qemu:///embed?root={base}/src",
        dr_uri=f"qemu:///embed?root={base}/dr",
    )
    write_site(home, "src", f'plugin = "physical"\nuri = "{env.src_uri}"\n')
    write_site(
        home,
        "dr",
        f'plugin = "physical"\nuri = "{env.dr_uri}"\npool_dir = "{base}/pool"\n'
        'domain_type = "qemu"\n',
    )
    try:
        yield env
    finally:
        env.release()
        kill_qemu(base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def azenv() -> Iterator[AzureEnv]:
    """Azurite (HTTPS, blobs on disk) and the fake ARM, one pinned certificate, per module."""
    with azure_doubles(persist=True) as env:
        yield env


@pytest.fixture(scope="module")
def awsenv() -> Iterator[AwsEnv]:
    """The AWS double (moto behind the EBS shim, HTTPS, a pinned cert), per module."""
    with aws_double() as env:
        yield env
