"""AWS as the source: EC2 instances -> KVM and -> Azure, through EBS snapshots and the EBS
direct APIs of the AWS double. Replicas judged byte for byte against the volumes' bytes;
changed blocks checked against what the test itself wrote."""

from __future__ import annotations

import random

import pytest
from test_physical_to_azure import latest_point
from test_physical_to_physical import point_files

from standby.core.config import Policy
from standby.plugins.physical import lab as lab_mod
from standby.providers.azure import vhd
from support.aws import AwsEnv
from support.azure import AzureEnv
from support.labenv import Lab, MiB, write_site

GiB = 1 << 30
BLOCK = 512 * 1024


@pytest.fixture(scope="module")
def lab(labenv: Lab, awsenv: AwsEnv, azenv: AzureEnv) -> Lab:
    write_site(labenv.home, "ec2", awsenv.site_toml())
    write_site(labenv.home, "azure", azenv.site_toml("fromaws"))
    return labenv


def assert_kvm_replica_equals_volumes(env: Lab, aws: AwsEnv, vm: str, inst: str) -> None:
    for disk, replica in point_files(env, vm).items():
        raw = env.base / f"{vm}-{disk}-vol.raw"
        aws.moto.save_image(raw, GiB, volume=aws.volume(inst, disk))
        same = lab_mod.images_equal(replica, raw, fmt_b="raw")
        raw.unlink()
        assert same, f"replica of {vm}/{disk} differs from the EBS volume"


def test_aws_to_kvm_full_incremental_and_a_lost_snapshot(lab: Lab, awsenv: AwsEnv) -> None:
    env, aws = lab, awsenv
    inst = aws.make_instance("ec2web", [1, 1])
    rng = random.Random(21)
    aws.moto.write(aws.volume(inst, "xvda"), 0, rng.randbytes(2 * MiB))
    aws.moto.write(aws.volume(inst, "sdf"), 100 * MiB, rng.randbytes(BLOCK))
    vm = env.engine.source("ec2").get_vm("ec2web")
    assert [(d.name, d.size, d.boot) for d in vm.disks] == [
        ("xvda", GiB, True),
        ("sdf", GiB, False),
    ]
    assert vm.cpus == 2 and vm.memory_mib == 1024, "t3.micro, from describe_instance_types"
    env.engine.protect("ec2web", "ec2", "dr", Policy(retain_count=2))
    full = env.engine.replicate("ec2web")
    assert full.kind == "full" and full.bytes_read == 2 * MiB + BLOCK, "only blocks held"
    assert_kvm_replica_equals_volumes(env, aws, "ec2web", inst)

    aws.moto.write(aws.volume(inst, "xvda"), 10 * MiB + 4096, b"\x33" * 65536)
    aws.moto.write(aws.volume(inst, "sdf"), 700 * MiB, b"\x44" * 4096)
    aws.moto.fault("CreateSnapshots", "RequestLimitExceeded", count=2, status=503)
    aws.moto.fault("ListChangedBlocks", "ThrottlingException", count=1)
    inc = env.engine.replicate("ec2web")
    assert inc.kind == "incremental"
    assert any(
        "AWS source: calls retried with backoff: RequestLimitExceeded x2, ThrottlingException x1"
        in n
        for n in inc.notes
    ), inc.notes
    assert inc.bytes_read == 2 * BLOCK, "list_changed_blocks: the two blocks written"
    assert inc.bytes_written == 3 * 65536, "the 64 KiB blocks the writes touched (2 + 1)"
    assert_kvm_replica_equals_volumes(env, aws, "ec2web", inst)
    # the previous cycle's snapshots are deleted once its successor is committed
    ours = aws.client("ec2").describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": "tag:standby-source-vm", "Values": [inst]}]
    )["Snapshots"]
    point = latest_point(env, "ec2web")
    tokens = {s["SnapshotId"] for s in ours}
    assert len(tokens) == 2, "one snapshot per volume is kept: the newest point's"

    # someone deletes standby's snapshot: the next cycle falls back to hash-compare
    aws.client("ec2").delete_snapshot(SnapshotId=sorted(tokens)[0])
    aws.moto.write(aws.volume(inst, "xvda"), 30 * MiB, b"\x55" * 65536)
    aws.moto.write(aws.volume(inst, "sdf"), 30 * MiB, b"\x56" * 65536)
    again = env.engine.replicate("ec2web")
    assert any("is gone or of another volume" in n for n in again.notes), again.notes
    assert again.bytes_written == 2 * 65536
    assert_kvm_replica_equals_volumes(env, aws, "ec2web", inst)
    assert latest_point(env, "ec2web").id > point.id


def test_aws_to_azure_cycles_match_the_volume(lab: Lab, awsenv: AwsEnv, azenv: AzureEnv) -> None:
    env, aws = lab, awsenv
    inst = aws.make_instance("ec2db", [1], itype="t3.small")
    vol = aws.volume(inst, "xvda")
    rng = random.Random(22)
    aws.moto.write(vol, MiB, rng.randbytes(3 * MiB))
    env.engine.protect("ec2db", "ec2", "azure", Policy(retain_count=2))
    full = env.engine.replicate("ec2db")
    assert full.kind == "full" and full.bytes_written == 3 * MiB
    assert_blob_equals_volume(env, aws, "ec2db", vol)
    aws.moto.write(vol, 200 * MiB, rng.randbytes(65536))
    inc = env.engine.replicate("ec2db")
    assert inc.kind == "incremental" and inc.bytes_read == BLOCK and inc.bytes_written == 65536
    assert_blob_equals_volume(env, aws, "ec2db", vol)


def assert_blob_equals_volume(env: Lab, aws: AwsEnv, vm: str, vol: str) -> None:
    """The point's page-blob snapshot equals the volume: every block the volume holds is
    equal, every page the blob holds outside them is zero, and the footer is valid."""
    point = latest_point(env, vm)
    container = env.engine.target("azure").clients.container  # type: ignore[attr-defined]
    blob = container.get_blob_client(
        point.ref["blobs"]["xvda"], snapshot=point.ref["snapshots"]["xvda"]
    )
    held = aws.moto.blocks(volume=vol)
    for idx in held:
        want = aws.moto.image(BLOCK, idx * BLOCK, volume=vol)
        got = blob.download_blob(offset=idx * BLOCK, length=BLOCK).readall()
        assert got == want, f"block {idx} differs"
    size = vhd.virtual_size(GiB)
    for r in blob.list_page_ranges():
        if r.cleared:
            continue
        start, end = int(r.start), min(int(r.end) + 1, size)
        for off in range(start - start % BLOCK, end, BLOCK):
            if off // BLOCK not in held:
                data = blob.download_blob(offset=off, length=BLOCK).readall()
                assert not any(data), f"blob holds data at {off} the volume does not"
    footer = blob.download_blob(offset=size, length=vhd.FOOTER).readall()
    assert vhd.parse_footer(footer).size == size


def test_aws_to_kvm_and_failback_onto_the_original_instance(lab: Lab, awsenv: AwsEnv) -> None:
    """EC2 -> KVM (planned), re-protect KVM -> AWS seeded from the stopped instance's volumes,
    failback onto that same instance: new volumes at its devices, same id, started."""
    env, aws, life = lab, awsenv, lab.lifecycle
    inst = aws.make_instance("ec2rt", [1])
    vol = aws.volume(inst, "xvda")
    aws.moto.write(vol, 0, random.Random(23).randbytes(MiB))
    env.engine.protect("ec2rt", "ec2", "dr", Policy(shutdown_timeout_seconds=1))
    env.engine.replicate("ec2rt")
    aws.moto.write(vol, 8 * MiB, b"\x71" * 65536)  # just before the planned failover
    fo = life.failover("ec2rt", kind="planned")
    assert fo.kind == "planned" and fo.data_loss_seconds == 0
    state = aws.client("ec2").describe_instances(InstanceIds=[inst])
    assert state["Reservations"][0]["Instances"][0]["State"]["Name"] == "stopped"
    life.commit("ec2rt")
    life.reprotect("ec2rt")
    dr_vm = env.engine.source("dr").get_vm("ec2rt")
    dev = dr_vm.disks[0].name
    lab_mod.guest_write(env.dr, "ec2rt", dev, 20 * MiB, 65536, 0x72)  # the VM works at DR
    back = env.engine.replicate("ec2rt")
    assert back.bytes_written == 65536, "seeded from the instance's own volumes"
    fb = life.failback("ec2rt")
    assert fb.kind == "planned" and fb.data_loss_seconds == 0
    got = aws.client("ec2").describe_instances(InstanceIds=[inst])["Reservations"][0]
    (home,) = got["Instances"]
    assert home["State"]["Name"] == "running", "the original instance runs again"
    new_vol = next(b["Ebs"]["VolumeId"] for b in home["BlockDeviceMappings"]
                   if b["DeviceName"] == "/dev/xvda")  # fmt: skip
    assert new_vol != vol, "a new volume from the point, the old one kept detached"
    assert aws.moto.image(65536, 20 * MiB, volume=new_vol) == b"\x72" * 65536
    assert aws.moto.image(65536, 8 * MiB, volume=new_vol) == b"\x71" * 65536
    old = aws.client("ec2").describe_volumes(VolumeIds=[vol])["Volumes"][0]
    assert old["State"] == "available"
    assert aws.instances_named("ec2rt") == [inst], "no second instance was launched"
