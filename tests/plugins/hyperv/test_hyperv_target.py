"""The core's target contract kit on the Hyper-V target (WinRM double + Samba), and what is
Hyper-V's own at a DR site: network mapping checked at protect, the write proof read from
the replica's BAT, a cycle file left half-made by a kill."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from standby.core.errors import StandbyError
from standby.core.extents import normalize
from standby.core.model import DiskSpec, Extent, NicSpec, PointInfo, ProtectionInfo, VMSpec
from standby.core.testing import TargetContract
from standby.plugins.hyperv.target import HyperVTarget
from support.hyperv import HyperVLab, start_hyperv

MiB = 1 << 20


@pytest.fixture(scope="module")
def hv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HyperVLab]:
    lab = start_hyperv(tmp_path_factory.mktemp("hvt"), env_prefix="STANDBY_TEST_HVT")
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture(scope="module")
def target(hv: HyperVLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HyperVTarget]:
    tgt = HyperVTarget(hv.site(tmp_path_factory.mktemp("home"), networks={"prod": "LAN"}))
    tgt.connect()
    try:
        yield tgt
    finally:
        tgt.close()


@pytest.fixture
def contract_protection() -> ProtectionInfo:
    vm = VMSpec(
        id="kit-1", name="kitvm", cpus=1, memory_mib=64,
        disks=(DiskSpec(name="vda", size=8 * MiB),),
        nics=(NicSpec(name="nic0", mac="52:54:00:00:00:99", network="prod"),),
    )  # fmt: skip
    return ProtectionInfo(id=42, vm=vm, source_site="src", target_site="hv")


@pytest.fixture
def read_point(hv: HyperVLab) -> object:
    def read(p: ProtectionInfo, point: PointInfo, disk: str, offset: int, length: int) -> bytes:
        return hv.chain_bytes(point.ref["files"][disk], offset, length)

    return read


class TestHyperVTarget(TargetContract):
    """Target side of the kit."""


def test_an_unmapped_network_is_a_problem_at_protect(
    target: HyperVTarget, contract_protection: ProtectionInfo
) -> None:
    vm = contract_protection.vm
    odd = VMSpec(vm.id, vm.name, vm.cpus, vm.memory_mib, disks=vm.disks,
                 nics=(NicSpec("nic0", "52:54:00:00:00:01", "dmz"),))  # fmt: skip
    verdict = target.validate(odd)
    assert not verdict.ok
    assert any("'dmz'" in p and "networks" in p for p in verdict.problems), verdict.problems
    assert target.validate(vm).size == "gen1-1vcpu-64MiB"


def test_the_write_proof_is_what_the_bat_holds(
    target: HyperVTarget, contract_protection: ProtectionInfo
) -> None:
    p = contract_protection
    target.prepare(p)
    with target.open_writer(p, 3, None) as w:
        w.write("vda", 0, b"\x01" * 65536)
        w.write("vda", 3 * MiB + 4096, b"\x02" * 8192)
        w.write_zeroes("vda", Extent(6 * MiB, 2 * MiB))
        w.flush()
        written = normalize([(0, 65536), (3 * MiB + 4096, 3 * MiB + 12288), (6 * MiB, 8 * MiB)])
        planned = normalize([(0, 8 * MiB)])
        # a fresh plain file: its blocks are whole, so what it holds spans whole blocks
        assert w.unproven("vda", written, planned) == []
        narrow = normalize([(0, 65536)])
        assert w.unproven("vda", written, narrow), "held outside the plan is named"
    target.discard_pending(p, 3)
    target.remove(p, [])


def test_a_half_made_cycle_file_is_made_again(
    hv: HyperVLab, target: HyperVTarget, contract_protection: ProtectionInfo
) -> None:
    p = contract_protection
    target.prepare(p)
    rel = target.cycle_file(p, "vda", 5)
    target.share.write_text(rel + ".tmp", "a kill while making the file")
    with target.open_writer(p, 5, None) as w:
        w.write("vda", MiB, b"\x05" * 65536)
        w.flush()
        assert w.read("vda", Extent(MiB, 65536)) == b"\x05" * 65536
    assert not target.share.exists(rel + ".tmp")
    target.discard_pending(p, 5)
    assert not target.share.exists(rel)
    target.remove(p, [])


def test_a_failover_the_host_refuses_is_one_line_and_leaves_nothing(
    hv: HyperVLab, target: HyperVTarget, contract_protection: ProtectionInfo
) -> None:
    p = contract_protection
    target.prepare(p)
    with target.open_writer(p, 1, None) as w:
        w.write("vda", 0, b"\x09" * 65536)
        ref = w.commit_point(1)
    point = PointInfo(1, datetime.now(UTC), ref, {"vda": 8 * MiB})
    with pytest.raises(StandbyError) as err:  # the cmdlet's own message, in one line
        target.failover(p, point, test=False, network="NoSuchSwitch", failover_id=77)
    assert "\n" not in str(err.value) and "Add-VMNetworkAdapter" in str(err.value)
    assert "kitvm" not in hv.model.vms
    target.cleanup_test(p, {"kind": "real", "failover_id": 77})
    assert not target.share.exists(f"{target.vm_dir(p)}\\failover-77")
    hv.model.fail_next.append("failover")  # the host gone as the failover starts
    with pytest.raises(StandbyError, match="WS-Management"):
        target.failover(p, point, test=True, failover_id=78)
    assert "kitvm-test" not in hv.model.vms
    target.remove(p, [point])
    assert not target.share.exists(target.vm_dir(p))
