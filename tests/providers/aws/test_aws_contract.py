"""The core's source and target contract kits against the AWS provider (moto + EBS shim)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from standby.core.config import Site
from standby.core.model import DiskSpec, NicSpec, PointInfo, ProtectionInfo, VMSpec
from standby.core.testing import SourceContract, TargetContract
from standby.providers.aws.source import AwsSource
from standby.providers.aws.target import AwsTarget
from support.aws import AwsEnv

MiB = 1 << 20


@pytest.fixture(scope="module")
def target(awsenv: AwsEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsTarget]:
    awsenv.make_dr_network()
    home = tmp_path_factory.mktemp("home")
    site = Site(name="aws-dr", plugin="aws", path=home / "aws-dr.toml", raw=awsenv.site_raw())
    tgt = AwsTarget(site)
    tgt.connect()
    try:
        yield tgt
    finally:
        tgt.close()


@pytest.fixture
def contract_protection() -> ProtectionInfo:
    vm = VMSpec(
        id="kit-1",
        name="kitvm",
        cpus=1,
        memory_mib=512,
        disks=(DiskSpec(name="vda", size=8 * MiB + 4096, format="qcow2"),),
        nics=(NicSpec(name="nic0", mac="52:54:00:00:00:99"),),
    )
    return ProtectionInfo(id=41, vm=vm, source_site="src", target_site="aws-dr")


@pytest.fixture
def read_point(target: AwsTarget) -> Callable[..., bytes]:
    def read(p: ProtectionInfo, point: PointInfo, disk: str, offset: int, length: int) -> bytes:
        return target.read_point(p, point, disk, offset, length)

    return read


class TestAwsTarget(TargetContract):
    """Target side of the kit: EBS snapshot chains through the shim's direct APIs."""


@pytest.fixture(scope="module")
def source(awsenv: AwsEnv, target: AwsTarget) -> Iterator[AwsSource]:
    """An EC2 instance made as an operator's would be: t3.micro, a 1 GiB root volume."""
    awsenv.make_instance("kitsrc", [1])
    site = Site(name="aws-src", plugin="aws", path=target.site.path, raw=target.site.raw)
    src = AwsSource(site)
    src.connect()
    try:
        yield src
    finally:
        src.close()


@pytest.fixture
def contract_vm() -> str:
    return "kitsrc"


@pytest.fixture
def mutate(awsenv: AwsEnv) -> Callable[..., None]:
    def write(vm: str, disk: str, offset: int, length: int, byte: int) -> None:
        awsenv.write(vm, disk, offset, length, byte)

    return write


class TestAwsSource(SourceContract):
    """Source side of the kit: create_snapshots + list/changed blocks through the shim."""
