"""A vault on S3 (the AWS double: moto behind the EBS shim): KVM -> vault cycles, the store
paused mid-cycle, and a failover from the vault to AWS (EBS snapshots, an EC2 instance)."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import pytest

from standby.core.config import Policy
from standby.plugins.physical import lab as lab_mod
from support.aws import AwsEnv
from support.labenv import Lab, MiB, write_site

ENV = {"SB_S3_VAULT": "s3 vault pass"}


@pytest.fixture(scope="module")
def lab(labenv: Lab, awsenv: AwsEnv) -> Lab:
    os.environ.update(ENV)
    awsenv.make_dr_network()
    write_site(labenv.home, "aws", awsenv.site_toml(connect_timeout=2, read_timeout=2))
    bucket = f"vault-{uuid.uuid4().hex[:10]}"
    awsenv.client("s3").create_bucket(Bucket=bucket)
    labenv.cli("vault", "create", "va", "--store", f"s3://{bucket}/dr", "--store-site", "aws",
               "--passphrase", "env:SB_S3_VAULT", check=True, env=ENV)  # fmt: skip
    write_site(labenv.home, "vs3", 'plugin = "vault"\nvault = "va"\nrun_on = "aws"\n')
    return labenv


def _restored_equals(env: Lab, vm: str, fmt: str = "raw") -> bool:
    out = env.base / f"{vm}.s3.{fmt}"
    env.cli("vault", "restore-disk", "va", vm, "vda", "--out", str(out), "--format", fmt,
            check=True, env=ENV)  # fmt: skip
    env.flush(vm, "vda")
    try:
        return lab_mod.images_equal(
            env.disk_path(vm, "vda"), out, fmt_b={"vhd": "vpc"}.get(fmt, fmt)
        )
    finally:
        out.unlink()


def test_kvm_to_an_s3_vault_and_a_failover_to_aws(lab: Lab, awsenv: AwsEnv) -> None:
    env = lab
    env.create_vm("vs1", [("vda", 24 * MiB, "qcow2")])
    env.write("vs1", "vda", 1 * MiB, 3 * MiB, 0x61)
    env.engine.protect("vs1", "src", "vs3", Policy(retain_count=2))
    env.engine.replicate("vs1")
    env.write("vs1", "vda", 9 * MiB, 65536, 0x62)
    inc = env.engine.replicate("vs1")
    assert inc.kind == "incremental" and inc.bytes_written == 65536
    env.release()
    assert _restored_equals(env, "vs1") and _restored_equals(env, "vs1", "vhd")
    r = env.cli("failover", "vs1", "--test", "--json", check=True, env=ENV)
    data = json.loads(r.stdout)
    assert "restoring point" in r.stderr and data["target_vm"].startswith("vs1")
    ec2 = awsenv.client("ec2")
    running = [i for res in ec2.describe_instances()["Reservations"] for i in res["Instances"]
               if i["State"]["Name"] == "running"]  # fmt: skip
    assert any(t["Value"] == str(data["failover"]) for i in running for t in i.get("Tags", [])
               if t["Key"] == "standby-failover")  # fmt: skip
    env.cli("failover", "cleanup", "vs1", check=True, env=ENV)


def test_the_s3_store_paused_mid_cycle_is_retried(lab: Lab, awsenv: AwsEnv) -> None:
    env = lab
    env.create_vm("vs2", [("vda", 16 * MiB, "qcow2")])
    env.write("vs2", "vda", 0, 6 * MiB, 0x63)
    env.engine.protect("vs2", "src", "vs3", Policy(retain_count=2))
    awsenv.moto.pause()
    resume = threading.Timer(3.0, awsenv.moto.resume)
    resume.start()
    started = time.monotonic()
    try:
        report = env.engine.replicate("vs2")
    finally:
        resume.join()
        awsenv.moto.resume()
    assert report.kind == "full" and time.monotonic() - started >= 3.0
    env.release()
    r = env.cli("vault", "check", "va", "--read-data", "--json", env=ENV)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"]
    assert _restored_equals(env, "vs2")
