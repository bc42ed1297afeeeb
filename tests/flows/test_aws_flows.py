"""KVM -> AWS and back, AWS -> KVM and AWS -> Azure, on the AWS double (moto + EBS shim).

Points are judged byte for byte: a point's EBS snapshots read back through the shim against
the source disk, a KVM replica against the source volume's bytes. Changed-block logic is
checked against what the test itself wrote, never against the double's answer alone."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from test_physical_to_azure import _domain_disk, latest_point

from standby.core.config import Policy
from standby.core.errors import TransientError
from standby.plugins.physical import lab as lab_mod
from support.aws import AwsEnv
from support.labenv import Lab, MiB, write_site


@pytest.fixture(scope="module")
def lab(labenv: Lab, awsenv: AwsEnv) -> Lab:
    awsenv.make_dr_network()
    write_site(labenv.home, "aws", awsenv.site_toml())
    # home is also where failback lands: it needs a replica directory
    write_site(
        labenv.home,
        "src",
        f'plugin = "physical"\nuri = "{labenv.src_uri}"\npool_dir = "{labenv.base}/srcpool"\n'
        'domain_type = "qemu"\n',
    )
    return labenv


def snapshots_of(aws: AwsEnv, protection: int) -> list[dict[str, object]]:
    got = aws.client("ec2").describe_snapshots(
        OwnerIds=["self"],
        Filters=[{"Name": "tag:standby-protection", "Values": [str(protection)]}],
    )
    return list(got["Snapshots"])


def assert_point_equals_source(env: Lab, aws: AwsEnv, vm: str, disks: dict[str, int]) -> None:
    """Each disk's snapshot of the newest point, read back, equals the source disk."""
    point = latest_point(env, vm)
    for disk, size in disks.items():
        raw = env.base / f"{vm}-{disk}-aws.raw"
        aws.moto.save_image(raw, size, snapshot=point.ref["snapshots"][disk])
        env.flush(vm, disk)
        same = lab_mod.images_equal(env.disk_path(vm, disk), raw, fmt_b="raw")
        raw.unlink()
        assert same, f"point of {vm}/{disk} differs from the source"


def test_kvm_to_aws_cycles_match_the_source(lab: Lab, awsenv: AwsEnv) -> None:
    env = lab
    env.create_vm("aw1", [("vda", 48 * MiB, "qcow2"), ("vdb", 16 * MiB + 4096, "qcow2")])
    env.write("aw1", "vda", 1 * MiB, 3 * MiB, 0x11)
    env.write("aw1", "vdb", 0, 256 * 1024, 0x22)
    env.engine.protect("aw1", "src", "aws", Policy(retain_count=2))
    full = env.engine.replicate("aw1")
    assert full.kind == "full" and full.bytes_read == 3 * MiB + 256 * 1024
    assert any(n.startswith("verify: every write checked by the service") for n in full.notes)
    sizes = {"vda": 48 * MiB, "vdb": 16 * MiB + 4096}
    assert_point_equals_source(env, awsenv, "aw1", sizes)

    before = awsenv.moto.stats()["calls"].get("PutSnapshotBlock", 0)
    env.write("aw1", "vda", 10 * MiB + 65536, 65536, 0x33)  # inside one 512 KiB block
    env.zero("aw1", "vda", 2 * MiB, 65536)
    env.write("aw1", "vdb", 16 * MiB, 4096, 0x44)  # the short last block
    inc = env.engine.replicate("aw1")
    assert inc.kind == "incremental" and inc.bytes_written == 65536 + 4096
    assert inc.bytes_zeroed == 65536
    puts = awsenv.moto.stats()["calls"]["PutSnapshotBlock"] - before
    assert puts == 3, f"three 512 KiB blocks changed, {puts} were put"
    assert_point_equals_source(env, awsenv, "aw1", sizes)

    env.src.lookupByName("aw1").blockResize("vda", 64 * MiB, 1)  # grown disk
    env.write("aw1", "vda", 60 * MiB, MiB, 0x55)
    env.engine.replicate("aw1")
    assert_point_equals_source(env, awsenv, "aw1", {**sizes, "vda": 64 * MiB})
    # retention: two points of two disks; the cycles' intermediate snapshots are gone
    with env.engine.state.session() as s:
        pid = env.engine.state.protection(s, "aw1").id
    snaps = snapshots_of(awsenv, pid)
    assert len(snaps) <= 2 * 2, [s["SnapshotId"] for s in snaps]
    assert all(s["State"] == "completed" for s in snaps)


def test_drill_through_the_cli(lab: Lab, awsenv: AwsEnv) -> None:
    env = lab
    r = env.cli("failover", "aw1", "--test", "--json", check=True)
    data = json.loads(r.stdout)
    assert data["target_vm"] == "aw1-test"
    assert "registering an image from recovery point" in r.stderr
    ec2 = awsenv.client("ec2")
    (inst,) = [
        i
        for res in ec2.describe_instances(
            Filters=[{"Name": "tag:standby-kind", "Values": ["test"]}]
        )["Reservations"]
        for i in res["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    assert (
        inst["InstanceType"]
        == env.engine.target("aws").validate(env.engine.source("src").get_vm("aw1")).size
    )
    vpc = inst["VpcId"]
    assert vpc != awsenv.vpc, "a drill never lands in the DR VPC"
    igws = ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [vpc]}])[
        "InternetGateways"
    ]
    assert not igws, "the test VPC has no way out"
    env.cli("failover", "cleanup", "aw1", check=True)
    states = {
        i["State"]["Name"]
        for res in ec2.describe_instances(
            Filters=[{"Name": "tag:standby-kind", "Values": ["test"]}]
        )["Reservations"]
        for i in res["Instances"]
    }
    assert states <= {"terminated"}
    assert not ec2.describe_images(Owners=["self"], Filters=[
        {"Name": "tag:standby-failover", "Values": [str(data["failover"])]}
    ])["Images"]  # fmt: skip


def test_planned_round_trip_through_aws(lab: Lab, awsenv: AwsEnv) -> None:
    """KVM -> AWS (planned, zero loss) -> commit -> re-protect AWS -> KVM (seeded from the
    original disks) -> failback home, only what the instance wrote travelling back."""
    env, life, e = lab, lab.lifecycle, lab.engine
    env.create_vm("rt2", [("vda", 32 * MiB, "qcow2"), ("vdb", 16 * MiB, "qcow2")])
    env.write("rt2", "vda", 0, 2 * MiB, 0x11)
    env.write("rt2", "vdb", MiB, MiB, 0x22)
    e.protect("rt2", "src", "aws", Policy(shutdown_timeout_seconds=1))
    e.replicate("rt2")
    env.write("rt2", "vda", 5 * MiB, 65536, 0x77)  # just before the planned failover
    fo = life.failover("rt2", kind="planned")
    assert fo.kind == "planned" and fo.data_loss_seconds == 0
    assert env.src.lookupByName("rt2").isActive() == 0, "the source VM was shut down"
    inst = next(iter(awsenv.instances_named("rt2")))
    vda = awsenv.volume(inst, "xvda")
    assert awsenv.moto.image(65536, 5 * MiB, volume=vda) == b"\x77" * 65536

    life.commit("rt2")
    life.reprotect("rt2")
    with e.state.session() as s:
        prot = e.state.protection(s, "rt2")
        assert (prot.source_site, prot.target_site) == ("aws", "src")
    awsenv.moto.write(vda, 9 * MiB, b"\x99" * 65536)  # the instance works in AWS
    awsenv.moto.write(awsenv.volume(inst, "sdf"), 0, b"\x98" * 65536)
    first = e.replicate("rt2")
    assert first.kind == "hashcompare"
    assert first.bytes_written == 2 * 65536, "only the blocks written in AWS travel back"
    awsenv.moto.write(vda, 12 * MiB, b"\x66" * 65536)  # written after the last cycle
    fb = life.failback("rt2")
    assert fb.kind == "planned" and fb.data_loss_seconds == 0
    state = awsenv.client("ec2").describe_instances(InstanceIds=[inst])
    assert state["Reservations"][0]["Instances"][0]["State"]["Name"] == "stopped"
    assert env.src.lookupByName("rt2").isActive() == 1
    home = _domain_disk(env.src, "rt2", "vda")
    assert lab_mod.has_pattern(home, 9 * MiB, 65536, 0x99), "the AWS write came home"
    assert lab_mod.has_pattern(home, 12 * MiB, 65536, 0x66), "the last write came home too"
    assert lab_mod.has_pattern(home, 5 * MiB, 65536, 0x77)
    assert lab_mod.has_pattern(_domain_disk(env.src, "rt2", "vdb"), 0, 65536, 0x98)


def test_plan_drill_on_aws(lab: Lab, awsenv: AwsEnv, tmp_path: Path) -> None:
    env = lab
    seen = tmp_path / "seen"
    plan = tmp_path / "awsplan.toml"
    plan.write_text(
        f"""
name = "aws-web"
[[groups]]
name = "web"
vms = ["aw1"]
  [[groups.after]]
  type = "wait"
  command = "echo $STANDBY_VM $STANDBY_VM_ADDRESS >> {seen}"
  timeout = "20s"
"""
    )
    r = env.cli("drill", str(plan), "--json", check=True)
    run = json.loads(r.stdout)
    report = json.loads((env.home / "reports" / f"drill-{run['run']}.json").read_text())
    (vm,) = report["vms"]
    assert vm["vm"] == "aw1" and vm["target_vm"] == "aw1-test" and vm["healthy"] is True
    assert vm["addresses"] and vm["addresses"][0].startswith("10.250.0.")
    assert seen.read_text().split() == ["aw1", vm["addresses"][0]]
    assert not list(awsenv.instances_named("aw1-test", running=True)), "drill cleaned up"


def test_throttling_is_retried_and_reported(lab: Lab, awsenv: AwsEnv) -> None:
    env = lab
    env.write("aw1", "vda", 20 * MiB, MiB, 0x5A)
    awsenv.moto.fault("PutSnapshotBlock", "RequestThrottledException", count=3)
    awsenv.moto.fault("CompleteSnapshot", "InternalServerException", count=1, status=500)
    cycle = env.engine.replicate("aw1")
    notes = [n for n in cycle.notes if "retried with backoff" in n]
    assert notes and "RequestThrottledException x3" in notes[0], cycle.notes
    assert "InternalServerException x1" in notes[0]
    assert_point_equals_source(env, awsenv, "aw1", {"vda": 64 * MiB, "vdb": 16 * MiB + 4096})


def test_service_failing_mid_cycle_resumes(lab: Lab, awsenv: AwsEnv) -> None:
    """The service keeps failing part-way (more than the retries): the cycle stops with a
    transient error, no point appears, and the next run resumes and completes it."""
    env = lab
    env.write("aw1", "vda", 30 * MiB, 8 * MiB, 0x61)
    before = latest_point(env, "aw1").id
    awsenv.moto.fault("PutSnapshotBlock", "ServiceUnavailableException", count=200, status=503)
    with pytest.raises(TransientError):
        env.engine.replicate("aw1")
    assert latest_point(env, "aw1").id == before, "no half point"
    awsenv.moto.clear_faults()
    again = env.engine.replicate("aw1")
    assert again.kind == "incremental"
    assert_point_equals_source(env, awsenv, "aw1", {"vda": 64 * MiB, "vdb": 16 * MiB + 4096})


def test_wrong_keys_are_one_line_and_exit_4(lab: Lab, awsenv: AwsEnv) -> None:
    env = lab
    r = env.cli("sites", "check", "aws", env={"STANDBY_TEST_AWS_KEY_ID": "wrong-key-id"})
    assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "AWS refused the credentials (AuthFailure)" in err[0], err
    assert "standby-test-secret" not in r.stderr + r.stdout


def test_server_stopped_mid_cycle(lab: Lab, awsenv: AwsEnv) -> None:
    """The AWS endpoint stops answering part-way through a cycle (SIGSTOP) and comes back:
    the calls time out and are retried, and the point, when it appears, is whole."""
    env = lab
    write_site(env.home, "aws", awsenv.site_toml(read_timeout=1, connect_timeout=1))
    env.release()
    env.write("aw1", "vda", 40 * MiB, 16 * MiB, 0x62)
    before = latest_point(env, "aw1").id

    def outage() -> None:
        time.sleep(0.3)
        awsenv.moto.pause()
        time.sleep(2.5)
        awsenv.moto.resume()

    stop = threading.Thread(target=outage)
    stop.start()
    try:
        try:
            env.engine.replicate("aw1")
        except TransientError:
            env.engine.replicate("aw1")  # the next run resumes the cycle
    finally:
        stop.join()
        awsenv.moto.resume()
    assert latest_point(env, "aw1").id > before
    assert_point_equals_source(env, awsenv, "aw1", {"vda": 64 * MiB, "vdb": 16 * MiB + 4096})
    write_site(env.home, "aws", awsenv.site_toml())
    env.release()


def test_unplanned_failover_to_aws(lab: Lab, awsenv: AwsEnv) -> None:
    env, life = lab, lab.lifecycle
    env.create_vm("up1", [("vda", 16 * MiB, "qcow2")])
    env.write("up1", "vda", 2 * MiB, MiB, 0x81)
    env.engine.protect("up1", "src", "aws", Policy())
    env.engine.replicate("up1")
    env.write("up1", "vda", 6 * MiB, 65536, 0x82)  # after the last point: lost, and said so
    fo = life.failover("up1", kind="unplanned")
    assert fo.kind == "unplanned" and fo.data_loss_seconds is not None
    (inst,) = awsenv.instances_named("up1")
    vol = awsenv.volume(inst, "xvda")
    assert awsenv.moto.image(MiB, 2 * MiB, volume=vol) == b"\x81" * MiB
    assert awsenv.moto.image(65536, 6 * MiB, volume=vol) == bytes(65536)
    life.commit("up1")
