"""Hyper-V as the DR site (the WinRM double, its share served by Samba): KVM -> Hyper-V cycles
with a differencing VHDX per point, judged byte for byte against the KVM disk as qemu-img
reads it; retention merging points; a drill on the private switch; an unplanned failover.
And the way home: Hyper-V -> KVM planned failover, re-protect seeded from the original VHDX,
failback onto the original Hyper-V VM, and protection from Hyper-V again (the VM now runs on
a differencing chain, which the source reads)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from doubles.hyperv_host import Nic
from test_lifecycle import domain_disk
from test_physical_to_azure import _managed_disk

from standby.core.config import Policy
from standby.core.errors import StandbyError
from standby.plugins.physical import lab
from support.azure import AzureEnv
from support.hyperv import HyperVLab, start_hyperv
from support.labenv import Lab, MiB, write_site

POLICY = Policy(shutdown_timeout_seconds=1, retain_count=2)


@pytest.fixture(scope="module")
def hv(labenv: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HyperVLab]:
    host = start_hyperv(tmp_path_factory.mktemp("hvdr"), env_prefix="STANDBY_TEST_HVDR")
    try:
        yield host
    finally:
        labenv.release()
        host.stop()


def raw_of(path: Path, fmt: str, tmp: Path) -> bytes:
    out = tmp / f"{path.name}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(out)],
                   check=True)  # fmt: skip
    data = out.read_bytes()
    out.unlink()
    return data


def points(env: Lab, vm: str) -> list[dict[str, str]]:
    with env.engine.state.session() as s:
        prot = env.engine.state.protection(s, vm)
        return [dict(p.ref["files"]) for p in prot.points if p.state == "visible"]


def test_kvm_to_hyperv_cycles_retention_drill_and_failover(
    labenv: Lab, hv: HyperVLab, tmp_path: Path
) -> None:
    env, host = labenv, hv.model
    env.create_vm("kh1", [("vda", 24 * MiB, "qcow2")])
    env.write("kh1", "vda", 0, 3 * MiB, 0x41)
    nets = {n.network for n in env.engine.source("src").get_vm("kh1").nics}
    hv.write_site(env.home, "hvdr", networks={n: "LAN" for n in nets})
    env.release()
    e, life = env.engine, env.lifecycle

    def assert_latest_equals_source() -> None:
        env.flush("kh1", "vda")
        want = raw_of(env.disk_path("kh1", "vda"), "qcow2", tmp_path)
        assert hv.chain_bytes(points(env, "kh1")[-1]["vda"]) == want

    e.protect("kh1", "src", "hvdr", POLICY)
    assert e.replicate("kh1").kind == "full"
    assert_latest_equals_source()
    for i, at in enumerate((5 * MiB, 11 * MiB, 17 * MiB)):
        env.write("kh1", "vda", at, 65536, 0x50 + i)
        inc = e.replicate("kh1")
        assert inc.kind == "incremental" and inc.bytes_written == 65536
        assert_latest_equals_source()
    # retention kept 2 points: the older ones were merged down, and their files are gone
    kept = points(env, "kh1")
    assert len(kept) == 2
    folder = host.local(kept[-1]["vda"]).parent
    assert sorted(p.name for p in folder.glob("*.vhdx")) == sorted(
        host.local(f["vda"]).name for f in kept
    )

    # a drill: the test VM runs on its own differencing disk, on the private switch
    env.write("kh1", "vda", 20 * MiB, 65536, 0x7E)  # after the point: not in the drill
    latest = hv.chain_bytes(kept[-1]["vda"])
    fo = life.failover("kh1", kind="test")
    test_vm = host.vms["kh1-test"]
    assert test_vm.state == "Running" and host.switches["standby-test"] == "Private"
    assert [n.switch for n in test_vm.nics] == ["standby-test"] * len(nets)
    assert hv.chain_bytes(host.winpath(test_vm.disks[0].path)) == latest
    life.cleanup("kh1")
    assert "kh1-test" not in host.vms and not Path(host.local(fo.ref["files"]["vda"])).exists()

    # unplanned: a generation 1 VM (the KVM VM boots with BIOS), IDE 0:0, MACs kept, on LAN
    real = life.failover("kh1", kind="unplanned")
    vm = host.vms["kh1"]
    assert vm.state == "Running" and vm.generation == 1 and "standby:replica" not in vm.notes
    assert (vm.disks[0].controller, vm.disks[0].number, vm.disks[0].location) == ("IDE", 0, 0)
    src_macs = [n.mac.replace(":", "").upper() for n in e.source("src").get_vm("kh1").nics]
    assert [n.mac for n in vm.nics] == src_macs and {n.switch for n in vm.nics} <= {"LAN"}
    assert hv.chain_bytes(real.ref["files"]["vda"]) == latest


def test_hyperv_failover_to_kvm_then_failback_onto_the_original_vm(
    labenv: Lab, hv: HyperVLab, tmp_path: Path
) -> None:
    env, host = labenv, hv.model
    vm = host.add_vm("hb1", [16])
    disk = vm.disks[0].name
    original = vm.disks[0].path
    host.guest_write("hb1", 0, MiB, b"\x31" * (2 * MiB))
    hv.write_site(env.home, "hv")
    env.release()
    e, life = env.engine, env.lifecycle
    e.protect("hb1", "hv", "dr", POLICY)
    e.replicate("hb1")
    host.guest_write("hb1", 0, 6 * MiB, b"\x36" * 65536)  # just before the planned failover

    planned = life.failover("hb1", kind="planned")
    assert planned.data_loss_seconds == 0 and host.vms["hb1"].state == "Off"
    assert env.dr.lookupByName("hb1").isActive() == 1
    life.commit("hb1")
    life.reprotect("hb1")  # KVM -> Hyper-V, seeded from the original VHDX
    dev = next(iter(domain_disk_devs(env, "hb1")))
    lab.guest_write(env.dr, "hb1", dev, 9 * MiB, 65536, 0x99)
    back = e.replicate("hb1")
    assert back.bytes_written == 65536, "only the block written at the DR site travels back"
    before = raw_of(original, "vhdx", tmp_path)

    fb = life.failback("hb1")
    assert fb.kind == "planned" and fb.vm_name == "hb1"
    assert env.dr.lookupByName("hb1").isActive() == 0
    home = host.vms["hb1"]
    assert home.state == "Running" and home.id == vm.id, "the original VM runs again"
    assert home.disks[0].path != original, "on a differencing disk over the failed-back point"
    data = hv.chain_bytes(host.winpath(home.disks[0].path))
    kvm = raw_of(domain_disk(env.dr, "hb1", dev), "qcow2", tmp_path)
    assert data == kvm, "the VM came home with exactly what it had at the DR site"
    assert data[9 * MiB : 9 * MiB + 65536] == b"\x99" * 65536
    assert data[6 * MiB : 6 * MiB + 65536] == b"\x36" * 65536
    assert raw_of(original, "vhdx", tmp_path) == before, "the original VHDX is only a parent"

    # and protected from Hyper-V again: the source reads the VM's differencing chain
    life.commit("hb1")
    life.reprotect("hb1")
    host.guest_write("hb1", 0, 12 * MiB, b"\xc1" * 65536)
    again = e.replicate("hb1")
    assert again.bytes_written == 65536
    assert disk == home.disks[0].name


def domain_disk_devs(env: Lab, name: str) -> list[str]:
    from standby.plugins.physical.domxml import disk_sources

    return list(disk_sources(env.dr.lookupByName(name).XMLDesc(0)))


def test_hyperv_to_azure_planned_then_failback_from_azure(
    labenv: Lab, hv: HyperVLab, azenv: AzureEnv
) -> None:
    """Hyper-V -> Azure (planned, zero loss), re-protect Azure -> Hyper-V seeded from the
    original VHDX (only what the VM wrote in Azure travels back), failback onto the original
    Hyper-V VM."""
    env, host, arm = labenv, hv.model, azenv.arm
    write_site(env.home, "azure", azenv.site_toml("replicas"))
    hv.write_site(env.home, "hv", networks={"default": "LAN"})  # Azure's subnet -> a switch
    env.release()
    azenv.make_dr_network()
    vm = host.add_vm("ha1", [16])
    disk = vm.disks[0].name
    host.guest_write("ha1", 0, 0, b"\x41" * (2 * MiB))
    e, life = env.engine, env.lifecycle
    e.protect("ha1", "hv", "azure", POLICY)
    e.replicate("ha1")
    host.guest_write("ha1", 0, 5 * MiB, b"\x45" * 65536)  # just before the planned failover

    fo = life.failover("ha1", kind="planned")
    assert fo.data_loss_seconds == 0 and host.vms["ha1"].state == "Off"
    assert "ha1" in arm.resources("vms")
    at_azure = arm.disk_data(_managed_disk(arm, "ha1", disk))
    assert at_azure.download_blob(offset=5 * MiB, length=65536).readall() == b"\x45" * 65536
    life.commit("ha1")
    life.reprotect("ha1")
    at_azure.upload_page(b"\x99" * 65536, offset=9 * MiB, length=65536)
    back = e.replicate("ha1")
    assert back.bytes_written == 65536, "only the block written in Azure travels back"

    fb = life.failback("ha1")
    assert fb.kind == "planned" and fb.vm_name == "ha1"
    home = host.vms["ha1"]
    assert home.state == "Running" and home.id == vm.id
    data = hv.chain_bytes(host.winpath(home.disks[0].path))
    azure = at_azure.download_blob(offset=0, length=16 * MiB).readall()
    assert data == azure, "the VM came home with exactly its Azure disk"
    assert data[9 * MiB : 9 * MiB + 65536] == b"\x99" * 65536


@pytest.fixture(scope="module")
def hv2(labenv: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HyperVLab]:
    """A second Hyper-V host: the DR site of a Hyper-V -> Hyper-V protection."""
    host = start_hyperv(tmp_path_factory.mktemp("hv2"), env_prefix="STANDBY_TEST_HV2")
    try:
        yield host
    finally:
        labenv.release()
        host.stop()


def test_hyperv_to_hyperv_drill_planned_and_failback(
    labenv: Lab, hv: HyperVLab, hv2: HyperVLab, tmp_path: Path
) -> None:
    env, host, dr = labenv, hv.model, hv2.model
    vm = host.add_vm("hh1", [16, 8])
    vm.nics.append(Nic("nic0", "00155D0A0B01", "LAN"))
    host.guest_write("hh1", 0, 0, b"\x11" * MiB)
    host.guest_write("hh1", 1, 2 * MiB, b"\x12" * 65536)
    hv.write_site(env.home, "hv")
    hv2.write_site(env.home, "hv2")
    env.release()
    e, life = env.engine, env.lifecycle

    def assert_points_equal_source() -> None:
        latest = points(env, "hh1")[-1]
        for d in host.vms["hh1"].disks:
            want = raw_of(d.path, "vhdx", tmp_path)
            assert hv2.chain_bytes(latest[d.name]) == want, d.name

    e.protect("hh1", "hv", "hv2", POLICY)
    assert e.replicate("hh1").kind == "full"
    assert_points_equal_source()
    host.guest_write("hh1", 0, 3 * MiB, b"\x13" * 65536)
    inc = e.replicate("hh1")
    assert inc.kind == "incremental" and inc.bytes_written == 65536, "RCT -> one block"
    assert_points_equal_source()

    life.failover("hh1", kind="test")
    test_vm = dr.vms["hh1-test"]
    assert test_vm.generation == 2 and [n.switch for n in test_vm.nics] == ["standby-test"]
    assert [d.name for d in test_vm.disks] == [d.name for d in vm.disks], "slots kept"
    life.cleanup("hh1")

    planned = life.failover("hh1", kind="planned")
    assert planned.data_loss_seconds == 0 and host.vms["hh1"].state == "Off"
    at_dr = dr.vms["hh1"]
    assert at_dr.state == "Running" and [n.mac for n in at_dr.nics] == ["00155D0A0B01"]
    life.commit("hh1")
    life.reprotect("hh1")  # hv2 -> hv, seeded from the original VHDX files
    dr.guest_write("hh1", 1, 5 * MiB, b"\x99" * 65536)
    back = e.replicate("hh1")
    assert back.bytes_written == 65536, "only what the VM wrote at the DR site travels back"

    life.failback("hh1")
    home = host.vms["hh1"]
    assert home.state == "Running" and home.id == vm.id and dr.vms["hh1"].state == "Off"
    got = hv.chain_bytes(host.winpath(home.disks[1].path))
    assert got == hv2.chain_bytes(dr.winpath(dr.vms["hh1"].disks[1].path))
    assert got[5 * MiB : 5 * MiB + 65536] == b"\x99" * 65536


def test_hyperv_replica_mode_drill_planned_reprotect_and_failback(
    labenv: Lab, hv: HyperVLab, hv2: HyperVLab, tmp_path: Path
) -> None:
    """`replication = "hyperv-replica"`: Hyper-V Replica moves the bytes (the double's
    replication ships the disks each interval), standby enables it, records its recovery
    points, drills with Start-VMFailover -AsTest, fails over planned (-Prepare first),
    reverses it on re-protect and fails back onto the original VM."""
    env, host, dr = labenv, hv.model, hv2.model
    host.name, dr.name = "hv-a.corp", "hv-b.corp"
    host.peers = dr.peers = {"hv-a.corp": host, "hv-b.corp": dr}
    vm = host.add_vm("rp1", [16])
    host.guest_write("rp1", 0, 0, b"\x71" * MiB)
    hv.write_site(env.home, "hv", replica_server="hv-a.corp")
    hv2.write_site(env.home, "hv2", replica_server="hv-b.corp")
    env.release()
    e, life = env.engine, env.lifecycle
    policy = Policy(replication="hyperv-replica", shutdown_timeout_seconds=1, retain_count=4)

    def replica_disk() -> bytes:
        return raw_of(dr.vms["rp1"].disks[0].path, "vhdx", tmp_path)

    e.protect("rp1", "hv", "hv2", policy)
    assert dr.vms["rp1"].repl is not None and dr.vms["rp1"].id == vm.id
    first = e.replicate("rp1")
    assert first.kind == "native" and first.bytes_read == 0, "Hyper-V moved the bytes"
    assert replica_disk() == raw_of(vm.disks[0].path, "vhdx", tmp_path)
    host.guest_write("rp1", 0, 4 * MiB, b"\x74" * 65536)
    second = e.replicate("rp1")
    assert second.point_id != first.point_id
    assert replica_disk() == raw_of(vm.disks[0].path, "vhdx", tmp_path)
    rows = json.loads(env.cli("status", "--json", check=True).stdout)
    row = next(r for r in rows if r["vm"] == "rp1")
    assert row["replication"] == "hyperv-replica" and row["health"] == "ok"
    assert row["points"] == 3, "the initial replication and two intervals"
    assert row["last_cycle"]["kind"] == "native"

    dr.replica_server = False  # a DR host not set up as a Replica server: one line, no change
    host.add_vm("rp2", [8])
    with pytest.raises(StandbyError, match="not a Hyper-V Replica server") as err:
        e.protect("rp2", "hv", "hv2", policy)
    assert "\n" not in str(err.value) and host.vms["rp2"].repl is None
    with e.state.session() as s, pytest.raises(StandbyError):
        e.state.protection(s, "rp2")
    dr.replica_server = True

    life.failover("rp1", kind="test")
    test_vm = dr.vms["rp1 - Test"]
    assert test_vm.state == "Running" and dr.switches["standby-test"] == "Private"
    life.cleanup("rp1")
    assert "rp1 - Test" not in dr.vms

    host.guest_write("rp1", 0, 6 * MiB, b"\x76" * 65536)  # just before the planned failover
    planned = life.failover("rp1", kind="planned")
    assert planned.data_loss_seconds == 0 and host.vms["rp1"].state == "Off"
    assert dr.vms["rp1"].state == "Running"
    assert replica_disk()[6 * MiB : 6 * MiB + 65536] == b"\x76" * 65536
    life.commit("rp1")
    life.reprotect("rp1")  # Set-VMReplication -Reverse: hv-b is the primary now
    assert dr.vms["rp1"].repl.mode == "Primary" and host.vms["rp1"].repl.mode == "Replica"  # type: ignore[union-attr]
    dr.guest_write("rp1", 0, 9 * MiB, b"\x99" * 65536)
    e.replicate("rp1")

    fb = life.failback("rp1")
    assert fb.kind == "planned" and host.vms["rp1"].state == "Running"
    assert dr.vms["rp1"].state == "Off"
    home = raw_of(host.vms["rp1"].disks[0].path, "vhdx", tmp_path)
    assert home[9 * MiB : 9 * MiB + 65536] == b"\x99" * 65536, "the DR-site write came home"
    assert home == replica_disk()
