"""The core's target contract kit, and vSphere DR-site rules, on the vcsim double."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from doubles.vcsim_proc import Vcsim

from standby.core.errors import ConfigError, NotFound, TransientError
from standby.core.model import DiskSpec, Extent, NicSpec, PointInfo, ProtectionInfo, VMSpec
from standby.core.testing import TargetContract
from standby.plugins.physical.lab import read_range
from standby.plugins.vmware.target import VMwareTarget
from standby.plugins.vmware.vmdk import extent_file
from support.vmware import vmware_site

MiB = 1 << 20


def target_keys(sim: Vcsim, **extra: object) -> dict[str, object]:
    assert sim.datastore_dir is not None
    return {"datastore": sim.datastore, "datastore_path": str(sim.datastore_dir), **extra}


@pytest.fixture(scope="module")
def target(vcsim: Vcsim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMwareTarget]:
    site = vmware_site(vcsim, tmp_path_factory.mktemp("home"), "dr", **target_keys(vcsim))
    tgt = VMwareTarget(site)
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
        memory_mib=64,
        disks=(DiskSpec(name="disk2000", size=8 * MiB),),
        nics=(NicSpec(name="nic0", mac="00:50:56:00:00:99", network="VM Network"),),
    )
    return ProtectionInfo(id=42, vm=vm, source_site="src", target_site="dr")


@pytest.fixture
def read_point() -> object:
    def read(p: ProtectionInfo, point: PointInfo, disk: str, offset: int, length: int) -> bytes:
        path = Path(point.ref["files"][disk])
        return read_range(path, offset, length)

    return read


def _point(pid: int, ref: dict[str, object], p: ProtectionInfo) -> PointInfo:
    return PointInfo(pid, datetime.now(UTC), dict(ref), {d.name: d.size for d in p.vm.disks})


class TestVMwareTarget(TargetContract):
    """Target side of the kit."""

    def test_failover_runs_the_point_as_a_flat_vmdk_on_a_new_vm(
        self, target: VMwareTarget, vcsim: Vcsim, contract_protection: ProtectionInfo
    ) -> None:
        p = contract_protection
        target.prepare(p)
        with target.open_writer(p, 1, None) as w:
            w.write("disk2000", 1 * MiB, b"\x5a" * 65536)
            ref = w.commit_point(1)
        point = _point(1, ref, p)
        result = target.failover(p, point, test=False, failover_id=5)
        try:
            flat = Path(result.ref["files"]["disk2000"])
            assert extent_file(flat.with_name("disk2000.vmdk")) == (flat, 8 * MiB)
            cmp = subprocess.run(
                ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", ref["files"]["disk2000"],
                 str(flat)], check=False,
            )  # fmt: skip
            assert cmp.returncode == 0
            disks = {d["deviceKey"]: d for d in vcsim.disks("kitvm")}
            assert Path(disks[2000]["file"]) == flat
            # the same failover again (an interrupted run repeated) finds its VM
            again = target.failover(p, point, test=False, failover_id=5)
            assert again.ref["vm"] == result.ref["vm"]
            with pytest.raises(ConfigError, match="already exists"):
                target.failover(p, point, test=False, failover_id=6)
        finally:
            target.cleanup_test(p, {"failover_id": 5, "kind": "planned"})
            target.remove(p, [point])
        assert "kitvm" not in [cfg.name for _, cfg in target._vms()]

    def test_test_failover_uses_a_port_group_without_uplink(
        self, target: VMwareTarget, contract_protection: ProtectionInfo
    ) -> None:
        p = contract_protection
        target.prepare(p)
        with target.open_writer(p, 1, None) as w:
            ref = w.commit_point(1)
        result = target.failover(p, _point(1, ref, p), test=True, failover_id=9)
        try:
            vm, _cfg = next((v, c) for v, c in target._vms() if c.name == "kitvm-test")
            nets = [n.name for n in vm.network]
            assert nets == ["standby-test"]
            host = vm.runtime.host
            switches = {v.name: v for v in host.configManager.networkSystem.networkInfo.vswitch}
            assert not switches["standby-isolated"].pnic, "the test vSwitch has no uplink"
        finally:
            target.cleanup_test(p, result.ref | {"failover_id": 9})
            target.remove(p, [])

    def test_validate_names_a_full_datastore_and_a_missing_port_group(
        self, target: VMwareTarget, vcsim: Vcsim, contract_protection: ProtectionInfo
    ) -> None:
        vm = contract_protection.vm
        odd = VMSpec(
            id="x", name="x", cpus=1, memory_mib=64, disks=vm.disks,
            nics=(NicSpec(name="nic0", mac="52:54:00:00:00:01", network="prod-net"),),
        )  # fmt: skip
        verdict = target.validate(odd)
        assert any("prod-net" in p and "networks" in p for p in verdict.problems)
        vcsim.set_free(4 * MiB)
        try:
            verdict = target.validate(vm)
            assert any("datastore 'LocalDS_0' has 0.0 GiB free" in p for p in verdict.problems)
        finally:
            vcsim.set_free(1 << 40)
        assert target.validate(vm).ok

    def test_a_datastore_path_that_is_not_the_datastore_is_refused(
        self, vcsim: Vcsim, tmp_path: Path
    ) -> None:
        other = tmp_path / "elsewhere"
        other.mkdir()
        site = vmware_site(vcsim, tmp_path, "dr2", datastore=vcsim.datastore,
                           datastore_path=str(other))  # fmt: skip
        with pytest.raises(ConfigError, match="is not datastore 'LocalDS_0'"):
            VMwareTarget(site).connect()
        site = vmware_site(vcsim, tmp_path, "dr3", datastore="nope", datastore_path=str(other))
        with pytest.raises(NotFound, match="datastore 'nope' not found"):
            VMwareTarget(site).connect()


def test_a_killed_session_is_resumed_by_the_next_one(
    target: VMwareTarget, vcsim: Vcsim, tmp_path: Path, contract_protection: ProtectionInfo
) -> None:
    """standby killed mid-cycle: its data mover still runs and holds the overlay. The next
    process (another target object) stops it by its pid file and continues the same cycle."""
    p = contract_protection
    target.prepare(p)
    cm = target.open_writer(p, 3, None)
    w = cm.__enter__()  # never left: the process "dies" here
    w.write("disk2000", 0, b"\x03" * 65536)
    w.flush()
    stale = target.mover(p)._stale_pid()
    assert stale is not None
    other = VMwareTarget(target.site)
    other.connect()
    try:
        with other.open_writer(p, 3, None) as again:
            assert again.read("disk2000", Extent(0, 65536)) == b"\x03" * 65536
            ref = again.commit_point(3)
        assert not Path(f"/proc/{stale}").exists() or "Z" in Path(f"/proc/{stale}/stat").read_text()
        assert read_range(Path(ref["files"]["disk2000"]), 0, 65536) == b"\x03" * 65536
    finally:
        other.discard_pending(p, 3)
        other.remove(p, [])
        other.close()


def test_a_full_datastore_fails_the_write_with_its_name(
    target: VMwareTarget, contract_protection: ProtectionInfo
) -> None:
    from standby.plugins.vmware.target import VMwareWriter

    class Full(OSError):
        errno = 28

    err = VMwareWriter(target, {}, target.mover(contract_protection), None, 1).failed(  # type: ignore[arg-type]
        "disk2000", "write at 0", Full()
    )
    assert str(err).startswith("datastore 'LocalDS_0' is full")
    assert not isinstance(err, TransientError), "a full datastore is not retried"
