"""AWS rules the provider enforces: instance type choice, volume limits, isolated test VPCs,
block checksums, paged listings checked against what the test itself changed."""

from __future__ import annotations

import base64
import hashlib
import io
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest

from standby.core.config import Site
from standby.core.errors import ConfigError, PluginError, TransientError
from standby.core.model import DiskSpec, Firmware, PointInfo, ProtectionInfo, VMSpec
from standby.providers.aws import compute, ebs
from standby.providers.aws.compute import InstanceType, choose_type
from standby.providers.aws.target import AwsTarget
from support.aws import AwsEnv

GiB = 1 << 30
TYPES = [
    InstanceType("t3.micro", 2, 1024, ("legacy-bios", "uefi"), ("x86_64",)),
    InstanceType("t3a.micro", 2, 1024, ("legacy-bios", "uefi"), ("x86_64",)),
    InstanceType("t2.micro", 1, 1024, ("legacy-bios",), ("x86_64",)),
    InstanceType("m5.large", 2, 8192, ("legacy-bios", "uefi"), ("x86_64",)),
    InstanceType("a1.large", 2, 4096, ("uefi",), ("arm64",)),
]
PRICES = {"t3.micro": 0.0104, "t3a.micro": 0.0094}


def vm(cpus: int = 1, memory: int = 512, firmware: Firmware = Firmware.BIOS) -> VMSpec:
    return VMSpec(id="v", name="v", cpus=cpus, memory_mib=memory, firmware=firmware,
                  disks=(DiskSpec("vda", GiB, boot=True),))  # fmt: skip


def test_smallest_type_that_fits_and_cheapest_among_equals() -> None:
    chosen, problems = choose_type(vm(), TYPES, None, PRICES.get)
    assert chosen is not None and chosen.name == "t2.micro" and not problems
    chosen, _ = choose_type(vm(cpus=2), TYPES, None, PRICES.get)
    assert chosen is not None and chosen.name == "t3a.micro", "cheaper of two equal types"
    chosen, _ = choose_type(vm(firmware=Firmware.UEFI), TYPES, None, PRICES.get)
    assert chosen is not None and chosen.name == "t3a.micro", "t2 has no UEFI"
    chosen, _ = choose_type(vm(cpus=2, memory=4096), TYPES, None, PRICES.get)
    assert chosen is not None and chosen.name == "m5.large", "a1 is arm64"


def test_a_type_the_region_lacks_or_too_small_is_a_problem() -> None:
    chosen, problems = choose_type(vm(), TYPES, "x2iedn.metal", PRICES.get)
    assert chosen is None and problems == [
        "instance type 'x2iedn.metal' is not offered in this region"
    ]
    chosen, problems = choose_type(vm(cpus=4), TYPES, "t3.micro", PRICES.get)
    assert chosen is None and "does not fit: the VM needs 4 vCPU(s)" in problems[0]
    chosen, problems = choose_type(vm(cpus=64), TYPES, None, PRICES.get)
    assert chosen is None and problems == [
        "no instance type in this region has 64 vCPU(s), 512 MiB and boot mode legacy-bios"
    ]


def test_volumes_over_the_direct_api_limit_are_refused() -> None:
    big = VMSpec(id="b", name="b", cpus=1, memory_mib=512,
                 disks=(DiskSpec("vda", GiB), DiskSpec("vdb", 17 << 40)))  # fmt: skip
    problems, _size, _notes = compute.validate(big, TYPES, None, PRICES.get)
    assert problems == [
        "disk 'vdb' is 17408 GiB; the EBS direct APIs take volumes of at most 16384 GiB"
    ]


@pytest.fixture(scope="module")
def target(awsenv: AwsEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsTarget]:
    awsenv.make_dr_network()
    home = tmp_path_factory.mktemp("home")
    raw = awsenv.site_raw(instance_type="x9.nowhere")
    tgt = AwsTarget(Site(name="aws", plugin="aws", path=home / "aws.toml", raw=raw))
    tgt.connect()
    try:
        yield tgt
    finally:
        tgt.close()


def test_the_region_without_the_configured_type(target: AwsTarget) -> None:
    verdict = target.validate(vm())
    assert not verdict.ok
    assert verdict.problems == ["instance type 'x9.nowhere' is not offered in this region"]
    assert len(target._types) > 20, "the types come from describe_instance_types"


def test_a_test_vpc_with_a_way_out_is_refused(target: AwsTarget, awsenv: AwsEnv) -> None:
    p = ProtectionInfo(1, vm(), "src", "aws")
    fo = compute.Failover(target.clients, p, "k1", lambda _m: None)
    with pytest.raises(ConfigError, match=r"has internet gateway igw-\w+: it is not isolated"):
        fo._isolated(awsenv.vpc)
    ec2 = awsenv.client("ec2")
    a = ec2.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
    b = ec2.create_vpc(CidrBlock="10.8.0.0/16")["Vpc"]["VpcId"]
    fo._isolated(a)  # no gateway, no peering: accepted
    ec2.create_vpc_peering_connection(VpcId=a, PeerVpcId=b)
    with pytest.raises(ConfigError, match=r"is peered \(pcx-"):
        fo._isolated(a)


def _snapshot(env: AwsEnv, blocks: dict[int, bytes], parent: str | None = None) -> str:
    client = env.client("ebs")
    args: dict[str, Any] = {"VolumeSize": 1}
    if parent:
        args["ParentSnapshotId"] = parent
    snap = str(client.start_snapshot(**args)["SnapshotId"])
    digests = {i: ebs.put_block(client, snap, i, data) for i, data in blocks.items()}
    ebs.complete(client, snap, digests)
    return snap


def test_paged_listings_return_exactly_what_changed(
    awsenv: AwsEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ebs, "PAGE", 100)  # the smallest page AWS allows: 3 pages here
    one, two = b"\x01" * ebs.BLOCK, b"\x02" * ebs.BLOCK
    first = _snapshot(awsenv, {i: one for i in range(0, 250)})
    changed = {i: two for i in range(120, 370, 2)}  # 125 blocks, 65 over old ones
    second = _snapshot(awsenv, changed, parent=first)
    client = awsenv.client("ebs")
    assert sorted(ebs.list_blocks(client, first)) == list(range(250))
    held = ebs.list_blocks(client, second)
    assert sorted(held) == sorted(set(range(250)) | set(changed)), "the parent's blocks inherited"
    diff = ebs.changed_blocks(client, first, second)
    assert sorted(diff) == sorted(changed)
    assert ebs.get_block(client, second, 120, str(diff[120])) == two
    assert ebs.get_block(client, second, 121, held[121]) == one


def test_the_service_refuses_a_wrong_aggregate_checksum(awsenv: AwsEnv) -> None:
    client = awsenv.client("ebs")
    snap = str(client.start_snapshot(VolumeSize=1)["SnapshotId"])
    ebs.put_block(client, snap, 0, b"\x07" * ebs.BLOCK)
    with pytest.raises(PluginError, match="checksum does not match"):
        ebs.complete(client, snap, {0: hashlib.sha256(b"other").digest()})
    with pytest.raises(PluginError, match="whole 524288-byte blocks"):
        ebs.put_block(client, snap, 1, b"\x07" * 4096)


class _Damaged:
    """An EBS client whose block arrives with a checksum that does not match it."""

    def get_snapshot_block(self, **_: Any) -> dict[str, Any]:
        wrong = base64.b64encode(hashlib.sha256(b"x").digest()).decode()
        return {
            "BlockData": io.BytesIO(bytes(ebs.BLOCK)),
            "Checksum": wrong,
            "ChecksumAlgorithm": "SHA256",
        }


def test_a_damaged_block_is_a_transient_error() -> None:
    with pytest.raises(TransientError, match="SHA-256 does not match"):
        ebs.get_block(_Damaged(), "snap-1", 3, "token")


def test_many_partial_blocks_each_put_once(target: AwsTarget, awsenv: AwsEnv) -> None:
    """300 scattered 64 KiB writes from 8 threads (more partial blocks than the writer keeps
    in memory): each 512 KiB block is put once, and the point holds every write."""
    mib = 1 << 20
    spec = VMSpec(id="pp", name="pp", cpus=1, memory_mib=512,
                  disks=(DiskSpec("vda", 256 * mib, boot=True),))  # fmt: skip
    p = ProtectionInfo(77, spec, "src", "aws")
    rng = random.Random(3)
    blocks = rng.sample(range(512), 300)
    pieces = [(i * ebs.BLOCK + 65536 * (i % 8), bytes([1 + i % 250]) * 65536) for i in blocks]
    before = awsenv.moto.stats()["calls"].get("PutSnapshotBlock", 0)
    with target.open_writer(p, 1, None) as w, ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda piece: w.write("vda", *piece), pieces))
        ref = w.commit_point(1)
    assert awsenv.moto.stats()["calls"]["PutSnapshotBlock"] - before == 300
    point = PointInfo(1, datetime.now(UTC), ref, {"vda": 256 * mib})
    raw = awsenv.base / "pp.raw"
    awsenv.moto.save_image(raw, 256 * mib, snapshot=ref["snapshots"]["vda"])
    want = bytearray(256 * mib)
    for off, data in pieces:
        want[off : off + len(data)] = data
    assert raw.read_bytes() == bytes(want)
    target.remove(p, [point])


def test_an_ec2_source_keeps_its_type_where_the_region_offers_it() -> None:
    src = VMSpec(id="i-1", name="web", cpus=2, memory_mib=1024, extra={"aws_instance_type":
                 "t3.micro"}, disks=(DiskSpec("xvda", GiB, boot=True),))  # fmt: skip
    problems, size, notes = compute.validate(src, TYPES, None, PRICES.get)
    assert not problems and size == "t3.micro", "not the cheaper t3a.micro: the source's own"
    assert "instance type t3.micro: the source instance's own" in notes
    gone = VMSpec(id="i-2", name="db", cpus=2, memory_mib=1024, extra={"aws_instance_type":
                  "x2gd.large"}, disks=(DiskSpec("xvda", GiB, boot=True),))  # fmt: skip
    problems, size, notes = compute.validate(gone, TYPES, None, PRICES.get)
    assert not problems and size == "t3a.micro"
    assert any("x2gd.large is not offered here" in n for n in notes)
