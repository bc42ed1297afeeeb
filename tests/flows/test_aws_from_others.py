"""vSphere -> AWS and Hyper-V -> AWS (the flow AWS Elastic Disaster Recovery sells): cycles
into EBS snapshot chains judged byte for byte against the VMDK's and the VHDX's content, a
drill in the isolated VPC."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from doubles.vcsim_proc import Vcsim
from test_physical_to_azure import latest_point

from standby.core.config import Policy
from standby.plugins.physical import lab
from support.aws import AwsEnv
from support.hyperv import HyperVLab, start_hyperv
from support.labenv import Lab, MiB, write_site
from support.vmware import vmdk_files


@pytest.fixture(scope="module")
def aws_lab(labenv: Lab, awsenv: AwsEnv) -> Lab:
    awsenv.make_dr_network()
    write_site(labenv.home, "aws", awsenv.site_toml())
    return labenv


@pytest.fixture(scope="module")
def hv(aws_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HyperVLab]:
    host = start_hyperv(tmp_path_factory.mktemp("hv"))
    host.model.add_vm("hvapp", [24, 8])
    host.write_site(aws_lab.home, "hv")
    try:
        yield host
    finally:
        aws_lab.release()
        host.stop()


def assert_points_equal(
    env: Lab, aws: AwsEnv, vm: str, files: dict[str, Path], fmt: str, sizes: dict[str, int]
) -> None:
    point = latest_point(env, vm)
    assert set(point.ref["snapshots"]) == set(files)
    for disk, path in files.items():
        raw = env.base / f"{vm}-{disk}-aws.raw"
        aws.moto.save_image(raw, sizes[disk], snapshot=point.ref["snapshots"][disk])
        same = lab.images_equal(path, raw, fmt_a=fmt, fmt_b="raw")
        raw.unlink()
        assert same, f"AWS point of {vm}/{disk} differs"


def test_vmware_to_aws_cycles_and_a_drill(aws_lab: Lab, awsenv: AwsEnv, vc: Vcsim) -> None:
    env = aws_lab
    spec = env.engine.source("vc").list_vms()[0]
    vm, disk = spec.name, spec.disks[0]
    key = int(disk.name.removeprefix("disk"))
    vc.write(vm, key, 0, bytes(range(256)) * 2048)
    vc.write(vm, key, 20 * MiB, b"\x44" * MiB)
    env.engine.protect(vm, "vc", "aws", Policy(retain_count=2))
    full = env.engine.replicate(vm)
    assert full.kind == "full"
    sizes = {d.name: d.size for d in spec.disks}
    assert_points_equal(env, awsenv, vm, vmdk_files(vc, vm), "raw", sizes)
    vc.write(vm, key, 7 * MiB, b"\x77" * 65536)
    inc = env.engine.replicate(vm)
    assert inc.kind == "incremental" and inc.bytes_written == 65536
    assert_points_equal(env, awsenv, vm, vmdk_files(vc, vm), "raw", sizes)
    r = env.cli("failover", vm, "--test", "--json", check=True)
    assert json.loads(r.stdout)["target_vm"].endswith("-test")
    env.cli("failover", "cleanup", vm, check=True)


def test_hyperv_to_aws_cycles(aws_lab: Lab, awsenv: AwsEnv, hv: HyperVLab) -> None:
    env, host = aws_lab, hv.model
    host.guest_write("hvapp", 0, MiB, bytes(range(256)) * 1024)
    host.guest_write("hvapp", 1, 0, b"\x11" * 65536)
    env.engine.protect("hvapp", "hv", "aws", Policy(retain_count=2))
    full = env.engine.replicate("hvapp")
    assert full.kind == "full"
    files = {d.name: d.path for d in host.vms["hvapp"].disks}
    sizes = {d.name: d.size for d in env.engine.source("hv").get_vm("hvapp").disks}
    assert_points_equal(env, awsenv, "hvapp", files, "vhdx", sizes)
    host.guest_write("hvapp", 0, 3 * MiB, b"\x33" * 65536)
    inc = env.engine.replicate("hvapp")
    assert inc.kind == "incremental" and inc.bytes_written == 65536
    assert_points_equal(env, awsenv, "hvapp", files, "vhdx", sizes)
