"""physical -> Azure: a real libvirt source VM replicated into Azurite, failed over via ARM."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from standby.core.config import Policy
from standby.core.engine import NullProgress
from standby.core.errors import StandbyError, TransientError
from standby.core.state import Failover, RecoveryPoint
from standby.plugins.physical import lab as lab_mod
from standby.providers.azure import vhd
from standby.providers.azure.target import AzureTarget
from support.azure import KEY_ENV, AzureEnv
from support.labenv import STANDBY, Lab, MiB, write_site


@pytest.fixture(scope="module")
def lab(labenv: Lab, azenv: AzureEnv) -> Lab:
    write_site(labenv.home, "azure", azenv.site_toml("replicas"))
    return labenv


def latest_point(env: Lab, vm: str) -> RecoveryPoint:
    with env.engine.state.session() as s:
        prot = env.engine.state.protection(s, vm)
        point = s.scalars(
            select(RecoveryPoint)
            .where(RecoveryPoint.protection_id == prot.id, RecoveryPoint.state == "visible")
            .order_by(RecoveryPoint.id.desc())
        ).first()
        assert point is not None
        s.expunge(point)
        return point


def azure_target(env: Lab) -> AzureTarget:
    target = env.engine.target("azure")
    assert isinstance(target, AzureTarget)
    return target


def assert_point_equals_source(
    env: Lab, vm: str, disks: dict[str, int], current: bool = False
) -> None:
    """Each disk's snapshot, read back and stripped of its footer, equals the source disk
    (`current`: the file the domain runs on now, e.g. after a failback; else the original)."""
    point = latest_point(env, vm)
    container = azure_target(env).clients.container
    for disk, size in disks.items():
        blob = container.get_blob_client(
            point.ref["blobs"][disk], snapshot=point.ref["snapshots"][disk]
        )
        data = blob.download_blob(max_concurrency=4).readall()
        assert len(data) == vhd.blob_size(size)
        footer = vhd.parse_footer(data[-vhd.FOOTER :])  # the footer validates
        assert footer.size == vhd.virtual_size(size)
        raw = env.base / f"{vm}-{disk}-point.raw"
        raw.write_bytes(data[: -vhd.FOOTER])
        env.flush(vm, disk)
        path = _domain_disk(env.src, vm, disk) if current else env.disk_path(vm, disk)
        same = lab_mod.images_equal(path, raw, fmt_b="raw")
        raw.unlink()
        assert same, f"point of {vm}/{disk} differs from the source"


def test_cycles_into_page_blobs_match_the_source(lab: Lab) -> None:
    env = lab
    env.create_vm("az1", [("vda", 48 * MiB, "qcow2"), ("vdb", 16 * MiB, "qcow2")])
    env.write("az1", "vda", 1 * MiB, 3 * MiB, 0x11)
    env.write("az1", "vdb", 0, 256 * 1024, 0x22)
    env.engine.protect("az1", "src", "azure", Policy(retain_count=2))
    full = env.engine.replicate("az1")
    assert full.kind == "full" and full.bytes_read == 3 * MiB + 256 * 1024
    # verify = auto on Azure: service-checked writes + a sample read back (here: all of it)
    assert any(
        n.startswith("verify: every write checked by the service") and n.endswith("compared")
        for n in full.notes
    ), full.notes
    assert_point_equals_source(env, "az1", {"vda": 48 * MiB, "vdb": 16 * MiB})

    env.write("az1", "vda", 10 * MiB, 65536, 0x33)
    env.zero("az1", "vda", 2 * MiB, 65536)
    inc = env.engine.replicate("az1")
    assert inc.kind == "incremental" and inc.bytes_written == 65536 and inc.bytes_zeroed == 65536
    assert_point_equals_source(env, "az1", {"vda": 48 * MiB, "vdb": 16 * MiB})

    # grow vdb: the old footer's place becomes disk space and must read as zeroes
    env.src.lookupByName("az1").blockResize("vdb", 20 * MiB, 1)
    env.write("az1", "vdb", 18 * MiB, 65536, 0x44)
    env.engine.replicate("az1")
    assert_point_equals_source(env, "az1", {"vda": 48 * MiB, "vdb": 20 * MiB})

    # retention: two points kept, the dropped snapshots and manifests are gone
    container = azure_target(env).clients.container
    snaps = [
        b
        for b in container.list_blobs(name_starts_with="p", include=["snapshots"])
        if b.snapshot and "az1" in b.name
    ]
    assert len(snaps) == 2 * 2
    manifests = [
        b.name
        for b in container.list_blobs(name_starts_with="p")
        if "/points/" in b.name and "az1" in b.name
    ]
    assert len(manifests) == 2
    manifest = json.loads(container.download_blob(manifests[-1]).readall())
    assert manifest["meta"]["consistency"] in ("crash", "app")
    assert set(manifest["disks"]) == {"vda", "vdb"}
    assert all(len(d["manifest_blake3"]) == 64 for d in manifest["meta"]["disks"].values())


def test_test_failover_and_cleanup_through_the_cli(lab: Lab, azenv: AzureEnv) -> None:
    env = lab
    arm = azenv.arm
    r = env.cli("failover", "az1", "--test", "--json", check=True)
    data = json.loads(r.stdout)
    assert data["target_vm"] == "az1-test"
    assert "importing 2 managed disk(s)" in r.stderr  # steps are shown
    vms = arm.resources("vms")
    assert set(vms) == {"az1-test"}
    vm = vms["az1-test"]["properties"]
    assert vm["hardwareProfile"]["vmSize"] == "Standard_B1s"  # smallest size with 1 core/64 MiB
    disks = arm.resources("disks")
    assert len(disks) == 2
    point = latest_point(env, "az1")
    sources = {d["properties"]["creationData"]["sourceUri"] for d in disks.values()}
    assert all("?snapshot=" in u for u in sources)
    assert {u.split("snapshot=")[1] for u in sources} == set(point.ref["snapshots"].values())
    nics = arm.resources("nics")
    assert len(nics) == 1
    subnet = next(iter(nics.values()))["properties"]["ipConfigurations"][0]["properties"]["subnet"]
    assert "/virtualNetworks/standby-test-isolated/subnets/isolated" in subnet["id"]
    assert all(r["tags"]["standby-failover"] == str(data["failover"]) for r in disks.values())

    r = env.cli("failover", "cleanup", "az1", check=True)
    assert not arm.resources("vms") and not arm.resources("disks") and not arm.resources("nics")


def test_allocation_failure_and_throttling_during_failover(lab: Lab, azenv: AzureEnv) -> None:
    env = lab
    arm = azenv.arm
    arm.inject("disk.create", status=429, times=2)
    arm.inject("vm.create", code="AllocationFailed")
    r = env.cli("failover", "az1", "--test")
    assert r.returncode == 7, r.stderr
    assert r.stderr.count("\n") <= 8 and "AllocationFailed" in r.stderr.splitlines()[-1]
    assert sum(1 for _m, _p, status in arm.requests if status == 429) == 2
    # rolled back: nothing left at the target, the failover is recorded as failed
    assert not arm.resources("vms") and not arm.resources("disks") and not arm.resources("nics")
    with env.engine.state.session() as s:
        states = [f.state for f in s.scalars(select(Failover).order_by(Failover.id))]
    assert states[-1] == "failed"
    # and the next attempt works
    env.cli("failover", "az1", "--test", check=True)
    assert set(arm.resources("vms")) == {"az1-test"}
    env.cli("failover", "cleanup", "az1", check=True)
    assert not arm.resources("disks")


def test_cost_estimate(lab: Lab) -> None:
    r = lab.cli("cost", "az1", "--json", check=True)
    (est,) = json.loads(r.stdout)
    items = {line["item"] for line in est["lines"]}
    assert "replica page blobs" in items and "after failover: VM Standard_B1s" in items
    assert est["monthly_storage"] > 0 and est["hourly_after_failover"] > 0.0104
    r = lab.cli("cost", "--site", "azure", check=True)
    assert "per month" in r.stdout


def test_bad_input_is_refused_with_one_line(lab: Lab, azenv: AzureEnv) -> None:
    env = lab
    # a disk above Azure's page-blob limit (sparse 9 TiB) is refused at protect, with the reason
    env.create_vm("azbig", [("vda", 64 * MiB, "qcow2"), ("vdb", 9 << 40, "qcow2")])
    r = env.cli("protect", "azbig", "--from", "src", "--to", "azure")
    assert r.returncode == 5, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "disk 'vdb'" in r.stderr and "page blob" in r.stderr
    # a wrong storage key: exit 4, one line, nothing recorded
    env.create_vm("azkey", [("vda", 16 * MiB, "qcow2")])
    r = env.cli(
        "protect",
        "azkey",
        "--from",
        "src",
        "--to",
        "azure",
        env={KEY_ENV: "d3Jvbmcga2V5IGZvciB0aGUgdGVzdA=="},
    )
    assert r.returncode == 4, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "authentication" in r.stderr
    r = env.cli("status", "--json", check=True)
    assert "azkey" not in r.stdout


def test_killed_failover_leaves_a_record_that_cleanup_clears(lab: Lab, azenv: AzureEnv) -> None:
    env = lab
    arm = azenv.arm
    arm.slow("vm.create", 20)
    env.release()
    proc = subprocess.Popen(
        [*STANDBY, "failover", "az1", "--test"],
        env={**os.environ, "STANDBY_HOME": str(env.home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while "az1-test" not in arm.resources("vms"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    arm.slow("vm.create", 0)
    assert arm.resources("disks") and arm.resources("nics")
    with env.engine.state.session() as s:
        last = s.scalars(select(Failover).order_by(Failover.id.desc())).first()
        assert last is not None and last.state == "starting"  # the record exists before Azure work
    r = env.cli("failover", "cleanup", "az1", check=True)
    assert not arm.resources("vms") and not arm.resources("disks") and not arm.resources("nics")
    assert "deleting 1 VM(s)" in r.stderr


class StopAzuriteMidCycle:
    """Engine progress that stops Azurite once the copy has moved some bytes."""

    def __init__(self, azenv: AzureEnv, after: int) -> None:
        self.azenv, self.after, self.moved, self.done = azenv, after, 0, False

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        self.moved += amount
        if not self.done and self.moved >= self.after:
            self.done = True
            self.azenv.azurite.stop()

    def finish(self) -> None:
        pass


def test_storage_down_mid_cycle_fails_cleanly_then_resumes(lab: Lab, azenv: AzureEnv) -> None:
    env = lab
    env.write("az1", "vda", 12 * MiB, 24 * MiB, 0x5A)
    env.write("az1", "vdb", 4 * MiB, 8 * MiB, 0xA5)
    with env.engine.state.session() as s:
        before = len(
            [p for p in env.engine.state.protection(s, "az1").points if p.state == "visible"]
        )
    env.engine.progress = StopAzuriteMidCycle(azenv, 4 * MiB)
    env.engine.workers = 2
    try:
        with pytest.raises(StandbyError) as info:
            env.engine.replicate("az1")
    finally:
        env.engine.progress = NullProgress()
        env.engine.workers = 4
    assert isinstance(info.value, TransientError), info.value
    with env.engine.state.session() as s:
        prot = env.engine.state.protection(s, "az1")
        assert len([p for p in prot.points if p.state == "visible"]) == before  # no half point
    azenv.restart_azurite()
    report = env.engine.replicate("az1")
    assert report.resumed
    assert_point_equals_source(env, "az1", {"vda": 48 * MiB, "vdb": 20 * MiB})


def _managed_disk(arm: object, vm: str, disk: str) -> str:
    """The name of the managed disk the failover made for one source disk of a VM."""
    disks = arm.resources("disks")  # type: ignore[attr-defined]
    return next(
        name
        for name, d in disks.items()
        if d["tags"].get("standby-disk") == disk and name.startswith(f"{vm}-")
    )


def _domain_disk(conn: object, name: str, dev: str) -> Path:
    from standby.plugins.physical.domxml import disk_sources

    dom = conn.lookupByName(name)  # type: ignore[attr-defined]
    return Path(disk_sources(dom.XMLDesc(0))[dev]["file"])


def test_planned_round_trip_through_azure(lab: Lab, azenv: AzureEnv) -> None:
    """KVM -> Azure (planned, zero loss) -> commit -> re-protect Azure -> KVM (seeded from the
    original disks) -> failback home -> commit -> re-protect KVM -> Azure again."""
    env, arm = lab, azenv.arm
    # home is where failback lands: it needs a replica directory
    write_site(
        env.home,
        "src",
        f'plugin = "physical"\nuri = "{env.src_uri}"\npool_dir = "{env.base}/srcpool"\n'
        'domain_type = "qemu"\n',
    )
    env.release()
    azenv.make_dr_network()
    e = env.engine
    life = env.lifecycle
    sizes = {"vda": 32 * MiB, "vdb": 16 * MiB}
    env.create_vm("rt1", [("vda", sizes["vda"], "qcow2"), ("vdb", sizes["vdb"], "qcow2")])
    env.write("rt1", "vda", 0, 2 * MiB, 0x11)
    env.write("rt1", "vdb", MiB, MiB, 0x22)
    e.protect("rt1", "src", "azure", Policy(shutdown_timeout_seconds=1))
    e.replicate("rt1")

    env.write("rt1", "vda", 5 * MiB, 65536, 0x77)  # just before the planned failover
    fo = life.failover("rt1", kind="planned")
    assert fo.kind == "planned" and fo.data_loss_seconds == 0
    assert env.src.lookupByName("rt1").isActive() == 0, "the source VM was shut down"
    assert "rt1" in arm.resources("vms")
    at_azure = arm.disk_data(_managed_disk(arm, "rt1", "vda"))
    assert at_azure.download_blob(offset=5 * MiB, length=65536).readall() == b"\x77" * 65536

    life.commit("rt1")
    life.reprotect("rt1")
    with e.state.session() as s:
        prot = e.state.protection(s, "rt1")
        assert (prot.source_site, prot.target_site) == ("azure", "src")

    # the VM works in Azure; only what it wrote travels back
    at_azure.upload_page(b"\x99" * 65536, offset=9 * MiB, length=65536)
    arm.disk_data(_managed_disk(arm, "rt1", "vdb")).upload_page(
        b"\x98" * 65536, offset=0, length=65536
    )
    first = e.replicate("rt1")
    assert first.kind == "hashcompare"
    assert first.bytes_written == 2 * 65536, "only the blocks written in Azure travel back"
    assert not arm.resources("snapshots"), "the cycle's disk snapshots are gone"

    fb = life.failback("rt1")
    assert fb.kind == "planned" and fb.data_loss_seconds == 0
    power = arm._vm_state[arm.resources("vms")["rt1"]["id"].lower()]["power"]
    assert power in ("deallocated", "deallocating", "stopped"), power
    assert env.src.lookupByName("rt1").isActive() == 1
    home_vda = _domain_disk(env.src, "rt1", "vda")
    assert lab_mod.has_pattern(home_vda, 9 * MiB, 65536, 0x99), "the Azure write came home"
    assert lab_mod.has_pattern(home_vda, 5 * MiB, 65536, 0x77)
    assert lab_mod.has_pattern(_domain_disk(env.src, "rt1", "vdb"), 0, 65536, 0x98)

    life.commit("rt1")
    life.reprotect("rt1")  # towards Azure again: the failed-over VM goes, the replica blobs seed
    assert "rt1" not in arm.resources("vms")
    assert not [n for n in arm.resources("disks") if n.startswith("rt1-")]
    again = e.replicate("rt1")
    assert again.bytes_written == 2 * 65536, "the replica blobs are read back, not re-sent"
    assert_point_equals_source(env, "rt1", sizes, current=True)
    with e.state.session() as s:
        prot = e.state.protection(s, "rt1")
        assert (prot.source_site, prot.target_site, prot.generation) == ("src", "azure", 3)


def test_plan_drill_on_azure(lab: Lab, azenv: AzureEnv, tmp_path: Path) -> None:
    """A recovery plan drilled against Azure: test VM in the isolated network, a command
    health check that sees the VM's Azure address, report, and nothing left afterwards."""
    env, arm = lab, azenv.arm
    seen = tmp_path / "seen"
    plan = tmp_path / "azplan.toml"
    plan.write_text(
        f"""
name = "azure-erp"
[[groups]]
name = "app"
vms = ["rt1"]
  [[groups.after]]
  type = "wait"
  command = "echo $STANDBY_VM $STANDBY_VM_ADDRESS >> {seen}"
  timeout = "20s"
"""
    )
    env.cli("plan", "check", str(plan), check=True)
    r = env.cli("drill", str(plan), "--json", check=True)
    run = json.loads(r.stdout)
    report = json.loads((env.home / "reports" / f"drill-{run['run']}.json").read_text())
    (vm,) = report["vms"]
    assert vm["vm"] == "rt1" and vm["target_vm"] == "rt1-test" and vm["healthy"] is True
    assert vm["point_id"] is not None and vm["addresses"][0].startswith("10.250.0.")
    assert seen.read_text().split() == ["rt1", vm["addresses"][0]]
    assert report["rto_seconds"] == vm["recovered_seconds"]
    assert not [n for n in arm.resources("vms") if n.endswith("-test")], "drill cleaned up"
    assert not [n for n in arm.resources("disks") if "-test" in n]


def test_unplanned_failover_to_azure_commit_and_reprotect(lab: Lab, azenv: AzureEnv) -> None:
    env = lab
    arm = azenv.arm
    azenv.make_dr_network()
    env.engine.replicate("az1")
    fo = env.lifecycle.failover("az1", kind="unplanned")
    assert fo.vm_name == "az1" and fo.data_loss_seconds is not None
    nic = next(iter(arm.resources("nics").values()))
    subnet = nic["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"]
    assert subnet.endswith("/virtualNetworks/dr-vnet/subnets/default")
    with env.engine.state.session() as s:
        prot = env.engine.state.protection(s, "az1")
        kept = [p.ref["snapshots"] for p in prot.points if p.state == "visible"]
    assert len(kept) == 2
    env.lifecycle.commit("az1")
    container = azure_target(env).clients.container
    snaps = {
        b.snapshot
        for b in container.list_blobs(name_starts_with="p", include=["snapshots"])
        if b.snapshot and "az1" in b.name
    }
    assert snaps == set(kept[-1].values()) or snaps == set(kept[0].values())
    assert len(snaps) == 2  # one point (2 disks) kept: the one the VM came from
    assert "az1" in arm.resources("vms")
    r = env.cli("reprotect", "az1")
    assert r.returncode == 2 and "is running at 'src'" in r.stderr  # home came back running
    env.src.lookupByName("az1").destroy()  # the operator stops it: Azure has the live copy
    r = env.cli("reprotect", "az1", check=True)
    with env.engine.state.session() as s:
        prot = env.engine.state.protection(s, "az1")
        assert (prot.source_site, prot.target_site) == ("azure", "src"), r.stdout
