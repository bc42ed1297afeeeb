"""The core's contract kit, run against the VMware source on the vcsim double."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from doubles.vcsim_proc import Vcsim

from standby.core.testing import SourceContract
from standby.plugins.vmware.source import VMwareSource
from support.vmware import vmware_site


@pytest.fixture(scope="module")
def source(vcsim: Vcsim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMwareSource]:
    src = VMwareSource(vmware_site(vcsim, tmp_path_factory.mktemp("home")))
    src.connect()
    try:
        yield src
    finally:
        src.close()


@pytest.fixture(scope="module")
def contract_vm(source: VMwareSource) -> str:
    return source.list_vms()[0].name


@pytest.fixture
def mutate(vcsim: Vcsim, source: VMwareSource) -> Callable[..., None]:
    def write(vm: str, disk: str, offset: int, length: int, byte: int) -> None:
        key = int(disk.removeprefix("disk"))
        vcsim.write(vm, key, offset, bytes([byte]) * length)

    return write


class TestVMwareSource(SourceContract):
    """Source side of the kit."""
