"""Protectability against AWS's rules, instance type choice, and failover to EC2 instances."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from standby.core.errors import ConfigError, NotFound, PluginError, TransientError
from standby.core.model import DiskSpec, FailoverResult, Firmware, PointInfo, ProtectionInfo, VMSpec
from standby.providers.aws import ebs
from standby.providers.aws.conn import AwsClients, AwsOptions, call, paged, tags_of
from standby.providers.aws.source import TAG_DISKS, TAG_KIND, short_device

GiB = 1 << 30
TAG_PROTECTION = "standby-protection"
TAG_FAILOVER = "standby-failover"
TAG_TEST_VPC = "standby-managed"
DATA_DEVICES = [f"/dev/sd{c}" for c in "fghijklmnopqrstuvwxyz"]
ROOT_DEVICE = "/dev/xvda"
MAX_DISKS = 1 + len(DATA_DEVICES)


@dataclass(frozen=True)
class InstanceType:
    """One entry of the region's `describe_instance_types`."""

    name: str
    vcpus: int
    memory_mib: int
    boot_modes: tuple[str, ...]
    architectures: tuple[str, ...]


def list_types(clients: AwsClients, names: list[str] | None = None) -> list[InstanceType]:
    """The x86_64 instance types the region offers (or the named ones), as the API says."""
    args: dict[str, Any] = {}
    if names:
        args["InstanceTypes"] = names
    else:
        args["Filters"] = [{"Name": "processor-info.supported-architecture", "Values": ["x86_64"]}]
    out = []
    for t in paged(
        "describe instance types", clients.ec2.describe_instance_types, "InstanceTypes", **args
    ):
        archs = tuple((t.get("ProcessorInfo") or {}).get("SupportedArchitectures") or ())
        out.append(
            InstanceType(
                name=str(t["InstanceType"]),
                vcpus=int((t.get("VCpuInfo") or {}).get("DefaultVCpus") or 0),
                memory_mib=int((t.get("MemoryInfo") or {}).get("SizeInMiB") or 0),
                boot_modes=tuple(t.get("SupportedBootModes") or ("legacy-bios",)),
                architectures=archs,
            )
        )
    return out


def boot_mode(vm: VMSpec) -> str:
    return "uefi" if vm.firmware == Firmware.UEFI else "legacy-bios"


def choose_type(
    vm: VMSpec, types: list[InstanceType], wanted: str | None, price: Callable[[str], float | None]
) -> tuple[InstanceType | None, list[str]]:
    """The given type checked, or the smallest that fits (cheapest among equals)."""
    mode = boot_mode(vm)
    need = f"{vm.cpus} vCPU(s), {vm.memory_mib} MiB and boot mode {mode}"

    def fits(t: InstanceType) -> bool:
        return (
            t.vcpus >= vm.cpus
            and t.memory_mib >= vm.memory_mib
            and mode in t.boot_modes
            and (not t.architectures or "x86_64" in t.architectures)
        )

    if wanted:
        match = next((t for t in types if t.name == wanted), None)
        if match is None:
            return None, [f"instance type '{wanted}' is not offered in this region"]
        if not fits(match):
            return None, [
                f"instance type '{match.name}' ({match.vcpus} vCPUs, {match.memory_mib} MiB, "
                f"boot modes {', '.join(match.boot_modes)}) does not fit: the VM needs {need}"
            ]
        return match, []
    fitting = [t for t in types if fits(t)]
    if not fitting:
        return None, [f"no instance type in this region has {need}"]
    inf = float("inf")
    best = min(
        fitting,
        key=lambda t: (
            t.vcpus,
            t.memory_mib,
            p if (p := price(t.name)) is not None else inf,
            t.name,
        ),
    )
    return best, []


def validate(
    vm: VMSpec, types: list[InstanceType], wanted: str | None, price: Callable[[str], float | None]
) -> tuple[list[str], str | None, list[str]]:
    """Every reason `vm` cannot run in EC2, the chosen instance type, and notes."""
    if not vm.disks:
        return ["the VM has no disks"], None, []
    problems: list[str] = []
    notes: list[str] = []
    for d in vm.disks:
        if d.size > ebs.MAX_DIRECT:
            problems.append(
                f"disk '{d.name}' is {d.size / GiB:.0f} GiB; the EBS direct APIs take volumes of "
                f"at most {ebs.MAX_DIRECT // GiB} GiB"
            )
    if len(vm.disks) > MAX_DISKS:
        problems.append(f"{len(vm.disks)} disks; standby attaches at most {MAX_DISKS} volumes")
    same = vm.extra.get("aws_instance_type")
    if not wanted and same:  # an EC2 instance from another region or account: its own type
        match = next((t for t in types if t.name == same), None)
        if match is not None and not choose_type(vm, [match], None, price)[1]:
            wanted = same
            notes.append(f"instance type {same}: the source instance's own")
        else:
            notes.append(f"the source's instance type {same} is not offered here; choosing by size")
    chosen, type_problems = choose_type(vm, types, wanted, price)
    problems.extend(type_problems)
    if chosen is not None:
        notes.append(
            f"failover instance type {chosen.name} ({chosen.vcpus} vCPUs, {chosen.memory_mib} MiB"
            f", boot mode {boot_mode(vm)})"
        )
    return problems, chosen.name if chosen else None, notes


def boot_disk(vm: VMSpec) -> DiskSpec:
    return next((d for d in vm.disks if d.boot), vm.disks[0])


def devices(vm: VMSpec) -> list[tuple[str, DiskSpec]]:
    """(device name, disk): the boot disk on /dev/xvda, the others on /dev/sdf...."""
    boot = boot_disk(vm)
    others = [d for d in vm.disks if d is not boot]
    return [(ROOT_DEVICE, boot), *zip(DATA_DEVICES, others, strict=False)]


def _safe(name: str, limit: int) -> str:
    return re.sub(r"[^A-Za-z0-9()\[\] ./'@_-]", "-", name)[:limit] or "vm"


class Failover:
    """One failover into EC2: an image from the point's snapshots, an instance from it."""

    def __init__(
        self,
        clients: AwsClients,
        protection: ProtectionInfo,
        key: str,
        step: Callable[[str], None],
    ) -> None:
        self.c = clients
        self.o: AwsOptions = clients.opts
        self.p = protection
        self.key = key
        self.step = step
        self.tags = {TAG_PROTECTION: str(protection.id), TAG_FAILOVER: key}

    def _tag_list(self, extra: Mapping[str, str] | None = None) -> list[dict[str, str]]:
        return [{"Key": k, "Value": v} for k, v in {**self.tags, **(extra or {})}.items()]

    def _filters(self) -> list[dict[str, Any]]:
        return [
            {"Name": f"tag:{TAG_FAILOVER}", "Values": [self.key]},
            {"Name": f"tag:{TAG_PROTECTION}", "Values": [str(self.p.id)]},
        ]

    # ------------------------------------------------------------ networks

    def _isolated(self, vpc_id: str) -> None:
        """Refuse a test VPC that reaches out: an internet gateway or a peering."""
        ec2 = self.c.ec2
        igws = call(
            "describe internet gateways",
            ec2.describe_internet_gateways,
            Filters=[{"Name": "attachment.vpc-id", "Values": [vpc_id]}],
        )
        if igws.get("InternetGateways"):
            gw = igws["InternetGateways"][0]["InternetGatewayId"]
            raise ConfigError(
                f"test VPC {vpc_id} has internet gateway {gw}: it is not isolated; name an "
                "isolated VPC in 'test_network.vpc_id' (or leave it out: standby makes one)"
            )
        for side in ("requester-vpc-info.vpc-id", "accepter-vpc-info.vpc-id"):
            peers = call(
                "describe VPC peerings",
                ec2.describe_vpc_peering_connections,
                Filters=[{"Name": side, "Values": [vpc_id]}],
            )
            live = [
                p["VpcPeeringConnectionId"]
                for p in peers.get("VpcPeeringConnections", [])
                if (p.get("Status") or {}).get("Code") in ("active", "pending-acceptance")
            ]
            if live:
                raise ConfigError(
                    f"test VPC {vpc_id} is peered ({', '.join(live)}): it is not isolated"
                )

    def _test_subnet(self) -> tuple[str, list[str]]:
        """The isolated test network: the configured VPC (checked), else one standby made."""
        ec2, tn = self.c.ec2, self.o.test_network
        vpc_id = tn.vpc_id
        if vpc_id is None:
            found = call(
                "describe VPCs",
                ec2.describe_vpcs,
                Filters=[{"Name": f"tag:{TAG_TEST_VPC}", "Values": ["isolated-test-network"]}],
            ).get("Vpcs", [])
            if found:
                vpc_id = str(found[0]["VpcId"])
            else:
                self.step(f"creating isolated test VPC ({tn.cidr})")
                vpc_id = str(call("create VPC", ec2.create_vpc, CidrBlock=tn.cidr)["Vpc"]["VpcId"])
                call(
                    "tag VPC",
                    ec2.create_tags,
                    Resources=[vpc_id],
                    Tags=[
                        {"Key": TAG_TEST_VPC, "Value": "isolated-test-network"},
                        {"Key": "Name", "Value": "standby isolated test network"},
                    ],
                )
        self._isolated(vpc_id)
        subnet = tn.subnet_id
        if subnet is None:
            subnets = call(
                "describe subnets",
                ec2.describe_subnets,
                Filters=[{"Name": "vpc-id", "Values": [vpc_id]}],
            ).get("Subnets", [])
            if subnets:
                subnet = str(subnets[0]["SubnetId"])
            else:
                made = call("create subnet", ec2.create_subnet, VpcId=vpc_id, CidrBlock=tn.cidr)
                subnet = str(made["Subnet"]["SubnetId"])
        groups = call(
            "describe security groups",
            ec2.describe_security_groups,
            Filters=[
                {"Name": "vpc-id", "Values": [vpc_id]},
                {"Name": "group-name", "Values": ["default"]},
            ],
        ).get("SecurityGroups", [])
        return subnet, [str(g["GroupId"]) for g in groups[:1]]

    def network(self, test: bool, override: str | None) -> tuple[str, list[str]]:
        """(subnet, security groups) for the instance."""
        if override:
            subnet, *groups = [p for p in override.split(",") if p]
            return subnet, groups
        if test:
            return self._test_subnet()
        if self.o.network is None:
            raise ConfigError(
                "site has no 'network' for failover (subnet_id and security_group_ids); set it "
                "in sites/<site>.toml or pass --network SUBNET[,SG...]"
            )
        net = self.o.network
        try:
            call("describe subnet", self.c.ec2.describe_subnets, SubnetIds=[net.subnet_id])
        except NotFound as exc:
            raise ConfigError(
                f"subnet '{net.subnet_id}' does not exist in {self.o.region}"
            ) from exc
        return net.subnet_id, list(net.security_group_ids)

    # ------------------------------------------------------------ failover

    def _mappings(self, point: PointInfo, test: bool) -> list[dict[str, Any]]:
        snaps: Mapping[str, str] = point.ref.get("snapshots", {})
        missing = [d.name for d in self.p.vm.disks if d.name not in snaps]
        if missing:
            raise PluginError(f"recovery point {point.id} has no snapshot of disk(s) {missing}")
        return [
            {
                "DeviceName": dev,
                "Ebs": {
                    "SnapshotId": snaps[d.name],
                    "VolumeSize": ebs.gib(d.size),
                    "VolumeType": "gp3",
                    "DeleteOnTermination": test,
                },
            }
            for dev, d in devices(self.p.vm)
        ]

    def _image(self, name: str, bdms: list[dict[str, Any]]) -> str:
        ec2 = self.c.ec2
        found = call(
            "describe images", ec2.describe_images, Owners=["self"], Filters=self._filters()
        ).get("Images", [])
        if found:
            return str(found[0]["ImageId"])
        image = call(
            f"register image {name}",
            ec2.register_image,
            Name=name,
            Description=f"standby failover of {self.p.vm.name}",
            Architecture="x86_64",
            RootDeviceName=ROOT_DEVICE,
            BlockDeviceMappings=bdms,
            VirtualizationType="hvm",
            EnaSupport=True,
            BootMode=boot_mode(self.p.vm),
        )
        image_id = str(image["ImageId"])
        call("tag image", ec2.create_tags, Resources=[image_id], Tags=self._tag_list())
        return image_id

    def _existing(self) -> dict[str, Any] | None:
        for res in paged(
            "describe instances",
            self.c.ec2.describe_instances,
            "Reservations",
            Filters=self._filters(),
        ):
            for inst in res.get("Instances", []):
                if (inst.get("State") or {}).get("Name") not in ("terminated", "shutting-down"):
                    return dict(inst)
        return None

    def run(self, point: PointInfo, test: bool, network: str | None, itype: str) -> FailoverResult:
        vm = self.p.vm
        name = f"{vm.name}-test" if test else vm.name
        kind = "test" if test else "failover"
        subnet, groups = self.network(test, network)
        bdms = self._mappings(point, test)
        self.step(f"registering an image from recovery point {point.id} ({len(bdms)} snapshot(s))")
        image = self._image(_safe(f"standby-{vm.name}-{kind}-{self.key}", 120), bdms)
        disks_tag = ",".join(f"{short_device(dev)}={d.name}:{d.size}" for dev, d in devices(vm))
        extra = {TAG_KIND: kind, "Name": name, TAG_DISKS: disks_tag, "standby-point": str(point.id)}
        inst = self._existing()
        if inst is None:
            self.step(f"launching instance {name} ({itype}) in subnet {subnet}")
            args: dict[str, Any] = {
                "ImageId": image,
                "InstanceType": itype,
                "MinCount": 1,
                "MaxCount": 1,
                "SubnetId": subnet,
                "BlockDeviceMappings": bdms,
                "ClientToken": f"standby-{self.p.id}-{self.key}",
                "TagSpecifications": [
                    {"ResourceType": "instance", "Tags": self._tag_list(extra)},
                    {"ResourceType": "volume", "Tags": self._tag_list({TAG_KIND: kind})},
                ],
            }
            if groups:
                args["SecurityGroupIds"] = groups
            inst = call(f"run instance {name}", self.c.ec2.run_instances, **args)["Instances"][0]
        assert inst is not None
        inst_id = str(inst["InstanceId"])
        self._wait_running(inst_id)
        ips = [str(inst["PrivateIpAddress"])] if inst.get("PrivateIpAddress") else []
        where = "isolated test VPC" if test else "DR subnet"
        return FailoverResult(
            ref={
                "failover_id": self.key,
                "instance_id": inst_id,
                "image_id": image,
                "vm": name,
                "subnet": subnet,
                "addresses": ips,
                "size": itype,
            },
            vm_name=name,
            summary=(
                f"EC2 instance {inst_id} ({name}, {itype}) running from point {point.id} in the "
                f"{where} ({subnet}), address {', '.join(ips) or '-'}"
            ),
        )

    def _wait_running(self, inst_id: str) -> None:
        deadline = time.monotonic() + self.o.operation_timeout
        while True:
            got = call("describe instance", self.c.ec2.describe_instances, InstanceIds=[inst_id])
            state = got["Reservations"][0]["Instances"][0]["State"]["Name"]
            if state == "running":
                return
            if state in ("terminated", "shutting-down", "stopped"):
                raise PluginError(f"instance {inst_id} did not start (state {state})")
            if time.monotonic() > deadline:
                raise TransientError(
                    f"instance {inst_id} not running after {self.o.operation_timeout}s"
                )
            time.sleep(self.o.poll_seconds)

    def cleanup(self) -> list[str]:
        """Terminate the failover's instances, deregister its images, delete its volumes."""
        ec2 = self.c.ec2
        removed: list[str] = []
        ids = []
        for res in paged(
            "describe instances", ec2.describe_instances, "Reservations", Filters=self._filters()
        ):
            for inst in res.get("Instances", []):
                if (inst.get("State") or {}).get("Name") != "terminated":
                    ids.append(str(inst["InstanceId"]))
        if ids:
            self.step(f"terminating {len(ids)} instance(s)")
            call("terminate instances", ec2.terminate_instances, InstanceIds=ids)
            removed += [f"instance {i}" for i in ids]
        images = call(
            "describe images", ec2.describe_images, Owners=["self"], Filters=self._filters()
        ).get("Images", [])
        for img in images:
            call("deregister image", ec2.deregister_image, ImageId=img["ImageId"])
            removed.append(f"image {img['ImageId']}")
        vols = call("describe volumes", ec2.describe_volumes, Filters=self._filters()).get(
            "Volumes", []
        )
        for vol in vols:
            if vol.get("State") == "available":
                try:
                    call("delete volume", ec2.delete_volume, VolumeId=vol["VolumeId"])
                except NotFound:
                    continue
                removed.append(f"volume {vol['VolumeId']}")
        return removed


def failover_instances(clients: AwsClients, protection: ProtectionInfo) -> list[dict[str, Any]]:
    """Real (not test) failover instances of a protection that still exist."""
    out = []
    for res in paged(
        "describe instances",
        clients.ec2.describe_instances,
        "Reservations",
        Filters=[
            {"Name": f"tag:{TAG_PROTECTION}", "Values": [str(protection.id)]},
            {"Name": f"tag:{TAG_KIND}", "Values": ["failover"]},
        ],
    ):
        for inst in res.get("Instances", []):
            if (inst.get("State") or {}).get("Name") != "terminated":
                out.append(dict(inst))
    return out


def new_key() -> str:
    return uuid.uuid4().hex[:8]


TAG_ORIGINAL = "standby-original-of"
"""On an EC2 instance a re-protect towards AWS was seeded from: the protection id, and the
disk -> device map (`standby-original-disks`): a failback goes back onto this instance."""
TAG_ORIGINAL_DISKS = "standby-original-disks"


def original_instance(clients: AwsClients, protection: ProtectionInfo) -> dict[str, Any] | None:
    """The instance a re-protect towards AWS was seeded from, if it is still there."""
    for res in paged(
        "describe instances",
        clients.ec2.describe_instances,
        "Reservations",
        Filters=[{"Name": f"tag:{TAG_ORIGINAL}", "Values": [str(protection.id)]}],
    ):
        for inst in res.get("Instances", []):
            if (inst.get("State") or {}).get("Name") not in ("terminated", "shutting-down"):
                return dict(inst)
    return None


class Failback(Failover):
    """A failover back onto the original instance: new volumes from the point replace its
    volumes at the same devices (the old ones are kept, detached and tagged), then it starts.
    The instance keeps its id, ENIs, addresses and settings."""

    def _wait_volume(self, vol: str, state: str) -> None:
        deadline = time.monotonic() + self.o.operation_timeout
        while True:
            got = call("describe volume", self.c.ec2.describe_volumes, VolumeIds=[vol])
            if got["Volumes"][0].get("State") == state:
                return
            if time.monotonic() > deadline:
                raise TransientError(f"volume {vol} not {state} after {self.o.operation_timeout}s")
            time.sleep(self.o.poll_seconds)

    def onto(self, point: PointInfo, inst: dict[str, Any]) -> FailoverResult:
        ec2, inst_id = self.c.ec2, str(inst["InstanceId"])
        state = (inst.get("State") or {}).get("Name")
        if state != "stopped":
            raise ConfigError(f"the original instance {inst_id} is {state}; it must be stopped")
        devices = {
            disk: f"/dev/{dev}"
            for dev, disk in (
                item.split("=", 1)
                for item in tags_of(inst).get(TAG_ORIGINAL_DISKS, "").split(",")
                if "=" in item
            )
        }
        snaps: Mapping[str, str] = point.ref.get("snapshots", {})
        missing = [d.name for d in self.p.vm.disks if d.name not in devices or d.name not in snaps]
        if missing:
            raise PluginError(f"the original instance {inst_id} has no device for {missing}")
        old = {
            str(b["DeviceName"]): str(b["Ebs"]["VolumeId"])
            for b in inst.get("BlockDeviceMappings", [])
            if "Ebs" in b
        }
        zone = str((inst.get("Placement") or {}).get("AvailabilityZone") or f"{self.o.region}a")
        self.step(f"making {len(devices)} volume(s) from recovery point {point.id} in {zone}")
        made: dict[str, str] = {}
        for d in self.p.vm.disks:
            vol = call(
                "create volume",
                ec2.create_volume,
                SnapshotId=snaps[d.name],
                AvailabilityZone=zone,
                VolumeType="gp3",
                Size=ebs.gib(d.size),
                TagSpecifications=[
                    {"ResourceType": "volume", "Tags": self._tag_list({TAG_KIND: "failback"})}
                ],
            )["VolumeId"]
            made[devices[d.name]] = str(vol)
        for vol in made.values():
            self._wait_volume(vol, "available")
        self.step(f"swapping the volumes of {inst_id} (its old volumes are kept, detached)")
        for dev, vol in made.items():
            if dev in old:
                call("detach volume", ec2.detach_volume, VolumeId=old[dev], InstanceId=inst_id)
                self._wait_volume(old[dev], "available")
                call(
                    "tag replaced volume",
                    ec2.create_tags,
                    Resources=[old[dev]],
                    Tags=[{"Key": "standby-replaced-by-failover", "Value": self.key}],
                )
            call("attach volume", ec2.attach_volume, VolumeId=vol, InstanceId=inst_id, Device=dev)
            self._wait_volume(vol, "in-use")
        self.step(f"starting the original instance {inst_id}")
        call("start instance", ec2.start_instances, InstanceIds=[inst_id])
        self._wait_running(inst_id)
        call(
            "untag instance",
            ec2.delete_tags,
            Resources=[inst_id],
            Tags=[{"Key": TAG_ORIGINAL}, {"Key": TAG_ORIGINAL_DISKS}],
        )
        name = tags_of(inst).get("Name") or inst_id
        return FailoverResult(
            ref={
                "failover_id": self.key,
                "instance_id": inst_id,
                "original": True,
                "volumes": made,
                "replaced": [old[d] for d in made if d in old],
            },
            vm_name=name,
            summary=f"the original instance {inst_id} ({name}) running on volumes from point "
            f"{point.id}; its former volumes are kept, detached",
        )


def seed_from_original(
    clients: AwsClients, protection: ProtectionInfo, original: VMSpec, step: Callable[[str], None]
) -> dict[str, Any] | None:
    """Snapshots of the original (stopped) instance's volumes as the new replica's base; the
    instance is tagged so a failback goes back onto it."""
    inst = None
    if original.id.startswith("i-"):
        got = call(
            "describe instance",
            clients.ec2.describe_instances,
            Filters=[{"Name": "instance-id", "Values": [original.id]}],
        )["Reservations"]
        inst = next(
            (i for r in got for i in r["Instances"] if i["State"]["Name"] != "terminated"), None
        )
    if inst is None:
        return None
    state = inst["State"]["Name"]
    if state != "stopped":
        raise ConfigError(
            f"the original instance {original.id} is {state}; stop it before re-protecting "
            "towards it"
        )
    vols = [
        (str(b["DeviceName"]), str(b["Ebs"]["VolumeId"]))
        for b in inst.get("BlockDeviceMappings", [])
        if "Ebs" in b
    ]
    by_name = {short_device(dev): (dev, vol) for dev, vol in vols}
    wanted = protection.vm.disks
    if all(d.name in by_name for d in wanted):
        chosen = [(d, *by_name[d.name]) for d in wanted]
    elif len(vols) == len(wanted):
        roots = ("/dev/xvda", "/dev/sda1", "/dev/sda", "/dev/nvme0n1")
        ordered = sorted(vols, key=lambda dv: (dv[0] not in roots, dv[0]))
        chosen = [(d, dev, vol) for d, (dev, vol) in zip(wanted, ordered, strict=True)]
    else:
        return None
    step(f"snapshotting the original instance {original.id}'s volumes as the seed")
    tags = {TAG_PROTECTION: str(protection.id), "standby-cycle": "seed"}
    got = call(
        "snapshot original volumes",
        clients.ec2.create_snapshots,
        InstanceSpecification={"InstanceId": original.id, "ExcludeBootVolume": False},
        Description=f"standby seed of {protection.vm.name}",
    )
    by_volume = {str(s["VolumeId"]): str(s["SnapshotId"]) for s in got.get("Snapshots", [])}
    snaps = {d.name: by_volume[vol] for d, _dev, vol in chosen}
    for d, _dev, _vol in chosen:
        call(
            "tag seed snapshot",
            clients.ec2.create_tags,
            Resources=[snaps[d.name]],
            Tags=[{"Key": k, "Value": v} for k, v in {**tags, "standby-disk": d.name}.items()],
        )
    for extra in set(by_volume.values()) - set(snaps.values()):
        call("delete snapshot", clients.ec2.delete_snapshot, SnapshotId=extra)
    ebs.wait_completed(
        clients.ec2, snaps.values(), clients.opts.operation_timeout, clients.opts.poll_seconds
    )
    disks_tag = ",".join(f"{short_device(dev)}={d.name}" for d, dev, _v in chosen)
    call(
        "tag the original instance",
        clients.ec2.create_tags,
        Resources=[original.id],
        Tags=[
            {"Key": TAG_ORIGINAL, "Value": str(protection.id)},
            {"Key": TAG_ORIGINAL_DISKS, "Value": disks_tag},
        ],
    )
    return {"snapshots": snaps, "sizes": {d.name: d.size for d, _dv, _v in chosen}}
