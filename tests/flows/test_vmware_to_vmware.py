"""vSphere -> vSphere (two vcsim doubles, the SRM scenario): cycles judged byte for byte
against the source VMDK, a drill on the isolated port group, a planned failover, re-protect
back to the first vCenter seeded from the original disks, failback onto the original VM,
and protection in the original direction again. Also KVM -> vSphere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from doubles.vcsim_proc import Vcsim, start_vcsim
from test_physical_to_physical import point_files

from standby.core.config import Policy
from standby.plugins.physical import lab
from support.labenv import Lab, MiB
from support.vmware import vmdk_files, write_vc_site

POLICY = Policy(retain_count=3, shutdown_timeout_seconds=1)  # no VMware Tools in the double


def dr_keys(sim: Vcsim) -> dict[str, object]:
    return {"datastore": sim.datastore, "datastore_path": str(sim.datastore_dir)}


@pytest.fixture(scope="module")
def sites(labenv: Lab, vc: Vcsim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    """`vc` (now also a DR site, for failback) and `vcdr`, a second vCenter with no VMs."""
    dr = start_vcsim(tmp_path_factory.mktemp("vcdr"), vms=0)
    write_vc_site(labenv.home, vc, "vc", **dr_keys(vc))
    write_vc_site(labenv.home, dr, "vcdr", password_env="STANDBY_TEST_VCDR_PASSWORD", **dr_keys(dr))
    labenv.release()
    try:
        yield dr
    finally:
        labenv.release()
        dr.stop()


def flat(sim: Vcsim, vm: str, key: int = 2000) -> Path:
    return vmdk_files(sim, vm)[f"disk{key}"]


def assert_point_equals(env: Lab, vm: str, files: dict[str, Path]) -> None:
    for disk, replica in point_files(env, vm).items():
        assert lab.images_equal(files[disk], replica, fmt_a="raw"), f"{vm}/{disk} differs"


def power(sim: Vcsim, env: Lab, site: str, vm: str) -> str:
    src = env.engine.source(site)
    return str(src._find(vm)[0].runtime.powerState)


def test_vmware_to_vmware_drill_failover_reprotect_failback(
    labenv: Lab, vc: Vcsim, sites: Vcsim
) -> None:
    env, dr = labenv, sites
    life = env.lifecycle
    vm = env.engine.source("vc").list_vms()[1].name
    vc.write(vm, 2000, 1 * MiB, b"\x11" * (256 * 1024))
    env.engine.protect(vm, "vc", "vcdr", POLICY)
    assert env.engine.replicate(vm).kind == "full"
    assert_point_equals(env, vm, vmdk_files(vc, vm))
    vc.write(vm, 2000, 3 * MiB, b"\x33" * 65536)
    inc = env.engine.replicate(vm)
    assert inc.kind == "incremental" and inc.bytes_written == 65536
    assert_point_equals(env, vm, vmdk_files(vc, vm))

    # a drill: the test VM runs on the point, on the isolated port group; the source runs on
    vc.write(vm, 2000, 9 * MiB, b"\x99" * 65536)  # after the point: not in the drill
    fo = life.failover(vm, kind="test")
    test_vm = env.engine.source("vcdr")  # the DR vCenter seen as a source: test VMs hidden
    assert vm + "-test" not in [v.name for v in test_vm.list_vms()]
    drill = Path(fo.ref["files"]["disk2000"])
    assert lab.images_equal(point_files(env, vm)["disk2000"], drill, fmt_b="raw")
    assert lab.has_pattern(drill, 9 * MiB, 65536, 0x00, fmt="raw")
    life.cleanup(vm)
    assert not drill.exists()

    # planned: the source stops, a last cycle ships the 0x99 write, the DR VM starts
    planned = life.failover(vm, kind="planned")
    assert planned.kind == "planned" and planned.data_loss_seconds == 0
    assert power(vc, env, "vc", vm) == "poweredOff"
    assert power(dr, env, "vcdr", vm) == "poweredOn"
    assert lab.images_equal(flat(vc, vm), flat(dr, vm), fmt_a="raw", fmt_b="raw")

    # the VM works at the DR site; re-protect towards vc is seeded from its original disks
    life.commit(vm)
    life.reprotect(vm)
    dr.write(vm, 2000, 12 * MiB, b"\xc1" * 65536)
    back = env.engine.replicate(vm)
    assert back.bytes_written == 65536, "only the block written at the DR site travels back"
    original_disk = flat(vc, vm)

    fb = life.failback(vm)
    assert fb.kind == "planned" and fb.vm_name == vm
    assert power(dr, env, "vcdr", vm) == "poweredOff"
    assert power(vc, env, "vc", vm) == "poweredOn", "the original VM runs again"
    home = flat(vc, vm)
    assert home != original_disk, "the original VM now backs onto the failed-back disks"
    assert lab.images_equal(home, flat(dr, vm), fmt_a="raw", fmt_b="raw")
    assert lab.has_pattern(home, 12 * MiB, 65536, 0xC1, fmt="raw")
    assert original_disk.exists(), "standby never deletes a disk it did not make"

    # and protected in the original direction again
    life.commit(vm)
    life.reprotect(vm)
    vc.write(vm, 2000, 20 * MiB, b"\x20" * 65536)
    again = env.engine.replicate(vm)
    assert again.bytes_written == 65536
    assert_point_equals(env, vm, vmdk_files(vc, vm))


def test_kvm_to_vmware_cycles_and_failover(labenv: Lab, sites: Vcsim) -> None:
    env, dr = labenv, sites
    env.create_vm("kv1", [("vda", 16 * MiB, "qcow2")])
    env.write("kv1", "vda", 2 * MiB, 65536, 0x4B)
    src = env.engine.source("src").get_vm("kv1")
    nets = {n.network for n in src.nics}
    write_vc_site(env.home, dr, "vcdr", password_env="STANDBY_TEST_VCDR_PASSWORD",
                  networks={n: "VM Network" for n in nets}, **dr_keys(dr))  # fmt: skip
    env.release()
    env.engine.protect("kv1", "src", "vcdr", POLICY)
    env.engine.replicate("kv1")
    env.write("kv1", "vda", 5 * MiB, 65536, 0x4C)
    env.engine.replicate("kv1")
    env.flush("kv1", "vda")
    replica = point_files(env, "kv1")["vda"]
    assert lab.images_equal(env.disk_path("kv1", "vda"), replica)
    fo = env.lifecycle.failover("kv1", kind="unplanned")
    assert lab.images_equal(replica, Path(fo.ref["files"]["vda"]), fmt_b="raw")
    obj, _cfg = env.engine.target("vcdr")._lookup("kv1")  # type: ignore[attr-defined]
    assert [n.name for n in obj.network] == ["VM Network"]
    assert str(obj.runtime.powerState) == "poweredOn"
