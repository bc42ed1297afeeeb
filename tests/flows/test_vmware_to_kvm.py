"""vSphere (the vcsim double) -> KVM: cycles checked byte for byte against the VMDK's backing
file, incrementals from CBT, a CBT reset, test and planned failover on the DR host."""

from __future__ import annotations

import json
import random
from pathlib import Path

from doubles.vcsim_proc import Vcsim
from test_physical_to_physical import point_files

from standby.core.config import Policy
from standby.plugins.physical import lab
from support.labenv import Lab, MiB
from support.vmware import vmdk_files


def first_vm(env: Lab) -> tuple[str, str]:
    vm = env.engine.source("vc").list_vms()[0]
    return vm.name, vm.disks[0].name


def key_of(disk: str) -> int:
    return int(disk.removeprefix("disk"))


def assert_replica_equals_vmdk(env: Lab, vc: Vcsim, vm: str) -> None:
    files = vmdk_files(vc, vm)
    for disk, replica in point_files(env, vm).items():
        assert lab.images_equal(files[disk], replica, fmt_a="raw"), f"{vm}/{disk} differs"


def test_vmware_to_kvm_full_incremental_and_cbt_reset(labenv: Lab, vc: Vcsim) -> None:
    env = labenv
    vm, disk = first_vm(env)
    key = int(disk.removeprefix("disk"))
    rng = random.Random(3)
    vc.write(vm, key, 1 * MiB, rng.randbytes(256 * 1024))
    env.engine.protect(vm, "vc", "dr", Policy(retain_count=3))
    full = env.engine.replicate(vm)
    assert full.kind == "full"
    assert_replica_equals_vmdk(env, vc, vm)

    vc.write(vm, key, 3 * MiB, b"\x33" * 65536)
    vc.write(vm, key, 5 * MiB + 65536, rng.randbytes(65536))
    inc = env.engine.replicate(vm)
    assert inc.kind == "incremental"
    assert inc.bytes_read <= 4 * 65536, "CBT: only the changed areas are read"
    assert inc.bytes_written == 2 * 65536
    assert_replica_equals_vmdk(env, vc, vm)

    vc.reset_cbt(vm, key)  # every changeId standby holds is now refused
    vc.write(vm, key, 7 * MiB, b"\x77" * 65536)
    after = env.engine.replicate(vm)
    assert any("change tracking was reset" in n for n in after.notes), after.notes
    assert after.bytes_written == 65536, "the full read is hash-compared: only the change ships"
    assert_replica_equals_vmdk(env, vc, vm)
    src = env.engine.source("vc")
    assert not src._our_snapshots(src._find(vm)[0]), "no standby snapshot is left behind"


def test_vmware_to_kvm_test_failover_and_cleanup(labenv: Lab, vc: Vcsim) -> None:
    env = labenv
    vm, disk = first_vm(env)
    vc.write(vm, key_of(disk), 9 * MiB, b"\x99" * 65536)  # after the point: must not show
    fo = env.lifecycle.failover(vm, test=True)
    assert fo.state == "running"
    dom = env.dr.lookupByName(fo.vm_name)
    assert dom.isActive() and "<target dev='vda'" in dom.XMLDesc(0), "disk2000 boots as vda"
    assert lab.has_pattern(Path(fo.ref["dir"]) / f"{disk}.qcow2", 9 * MiB, 65536, 0x00)
    env.lifecycle.cleanup(vm)
    assert fo.vm_name not in {d.name() for d in env.dr.listAllDomains()}
    assert env.engine.replicate(vm).bytes_read == 65536, "replication goes on after the drill"


def test_a_plan_drill_mixes_a_vmware_vm_and_a_kvm_vm(
    labenv: Lab, vc: Vcsim, tmp_path: Path
) -> None:
    """One recovery plan: the database on vSphere, the app on a KVM host, both drilled onto
    the same KVM DR site in order, reported, and cleaned up."""
    env = labenv
    vm, _disk = first_vm(env)
    env.create_vm("kvmapp", [("vda", 8 * MiB, "qcow2")])
    env.write("kvmapp", "vda", 0, 65536, 0x61)
    env.engine.protect("kvmapp", "src", "dr", Policy())
    env.engine.replicate("kvmapp")
    order = tmp_path / "order"
    plan = tmp_path / "mixed.toml"
    plan.write_text(
        f"""
name = "mixed"
[[groups]]
name = "database"
vms = ["{vm}"]
  [[groups.after]]
  type = "script"
  command = "echo $STANDBY_VM >> {order}"
[[groups]]
name = "app"
vms = ["kvmapp"]
  [[groups.after]]
  type = "script"
  command = "echo $STANDBY_VM >> {order}"
"""
    )
    env.cli("plan", "check", str(plan), check=True)
    r = env.cli("drill", str(plan), "--json", check=True)
    run = json.loads(r.stdout)
    report = json.loads((env.home / "reports" / f"drill-{run['run']}.json").read_text())
    assert {v["vm"] for v in report["vms"]} == {vm, "kvmapp"}
    assert all(v["point_id"] is not None for v in report["vms"])
    assert order.read_text().split() == [vm, "kvmapp"], "groups ran in order"
    assert not [d for d in env.engine.target("dr").domain_names() if d.endswith("-test")]
