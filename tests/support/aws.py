"""The AWS double for tests: moto's server behind the EBS shim, and what an operator would
have made in the account beforehand (a DR VPC, subnet and security group; source instances)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from doubles.moto_proc import ACCESS_KEY, SECRET_KEY, Moto, start_moto

from support.tomlfmt import value as _toml

KEY_ID_ENV = "STANDBY_TEST_AWS_KEY_ID"
SECRET_ENV = "STANDBY_TEST_AWS_SECRET"
REGION = "us-east-1"
MiB = 1 << 20
GiB = 1 << 30


@dataclass
class AwsEnv:
    """A running AWS double and the DR network made in it."""

    base: Path
    moto: Moto
    vpc: str = ""
    subnet: str = ""
    group: str = ""
    image: str = ""
    instances: dict[str, str] = field(default_factory=dict)

    def client(self, service: str, key: str = ACCESS_KEY, pool: int = 10) -> Any:
        from botocore.config import Config

        return boto3.client(
            service,
            config=Config(max_pool_connections=pool),
            endpoint_url=self.moto.url,
            verify=str(self.moto.cert),
            region_name=REGION,
            aws_access_key_id=key,
            aws_secret_access_key=SECRET_KEY,
        )

    def site_raw(self, **extra: Any) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "region": REGION,
            "access_key_id": f"env:{KEY_ID_ENV}",
            "secret_access_key": f"env:{SECRET_ENV}",
            "endpoint_url": self.moto.url,
            "ca_file": str(self.moto.cert),
            "network": {"subnet_id": self.subnet, "security_group_ids": [self.group]},
            "poll_seconds": 0.05,
        }
        raw.update(extra)
        return raw

    def site_toml(self, **extra: Any) -> str:
        raw = self.site_raw(**extra)
        net = raw.pop("network")
        lines = ['plugin = "aws"']
        for k, v in raw.items():
            lines.append(f"{k} = {_toml(v)}")
        groups = ", ".join(_toml(g) for g in net["security_group_ids"])
        subnet = _toml(net["subnet_id"])
        lines.append(f"network = {{ subnet_id = {subnet}, security_group_ids = [{groups}] }}")
        return "\n".join(lines) + "\n"

    def make_dr_network(self) -> None:
        """The DR VPC, subnet and security group failovers are mapped into (idempotent)."""
        if self.subnet:
            return
        ec2 = self.client("ec2")
        self.vpc = vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
        self.subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.0.0/24")["Subnet"]["SubnetId"]
        self.group = ec2.create_security_group(
            GroupName="dr-app", Description="DR application tier", VpcId=vpc
        )["GroupId"]
        igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
        ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)

    def _image(self) -> str:
        """An AMI to launch source instances from (an empty root snapshot)."""
        if not self.image:
            ebs = self.client("ebs")
            snap = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
            ebs.complete_snapshot(SnapshotId=snap, ChangedBlocksCount=0)
            self.image = self.client("ec2").register_image(
                Name="source-base-image",
                RootDeviceName="/dev/xvda",
                VirtualizationType="hvm",
                BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snap}}],
            )["ImageId"]
        return self.image

    def make_instance(self, name: str, disks_gib: list[int], itype: str = "t3.micro") -> str:
        """A running source instance with EBS volumes of the given sizes (xvda, sdf, ...)."""
        self.make_dr_network()
        bdms = [{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": disks_gib[0]}}]
        bdms += [
            {"DeviceName": f"/dev/sd{chr(ord('f') + i)}", "Ebs": {"VolumeSize": g}}
            for i, g in enumerate(disks_gib[1:])
        ]
        inst = self.client("ec2").run_instances(
            ImageId=self._image(),
            InstanceType=itype,
            MinCount=1,
            MaxCount=1,
            SubnetId=self.subnet,
            BlockDeviceMappings=bdms,
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}]}
            ],
        )["Instances"][0]
        self.instances[name] = inst["InstanceId"]
        return str(inst["InstanceId"])

    def instances_named(self, name: str, running: bool = False) -> list[str]:
        """Ids of the instances tagged Name=`name` that are not terminated (or running)."""
        got = self.client("ec2").describe_instances(
            Filters=[{"Name": "tag:Name", "Values": [name]}]
        )
        wanted = (
            {"running", "pending"} if running else {"running", "pending", "stopped", "stopping"}
        )
        return [
            str(i["InstanceId"])
            for r in got["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] in wanted
        ]

    def volume(self, instance: str, device: str) -> str:
        """The volume id at `device` (`xvda`, `sdf`) of an instance (id or name)."""
        inst_id = self.instances.get(instance, instance)
        if not inst_id.startswith("i-"):
            inst_id = self.instances_named(instance)[0]
        got = self.client("ec2").describe_instances(InstanceIds=[inst_id])
        for bdm in got["Reservations"][0]["Instances"][0]["BlockDeviceMappings"]:
            if bdm["DeviceName"].removeprefix("/dev/") == device:
                return str(bdm["Ebs"]["VolumeId"])
        raise KeyError(device)

    def write(self, instance: str, device: str, offset: int, length: int, byte: int) -> None:
        """A guest write into an instance's volume."""
        self.moto.write(self.volume(instance, device), offset, bytes([byte]) * length)


@contextmanager
def aws_double(base: Path | None = None) -> Iterator[AwsEnv]:
    """Start the AWS double; stop it by PID at the end (its directory kept when given)."""
    keep = base is not None
    base = base or Path(tempfile.mkdtemp(prefix="sbaws", dir="/tmp"))
    moto = start_moto(base / "moto")
    old = {k: os.environ.get(k) for k in (KEY_ID_ENV, SECRET_ENV)}
    os.environ[KEY_ID_ENV] = ACCESS_KEY
    os.environ[SECRET_ENV] = SECRET_KEY
    try:
        yield AwsEnv(base, moto)
    finally:
        moto.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
