"""vSphere bad input and faults: a wrong thumbprint, password or datacenter is one line and
an exit code; a disk CBT cannot track is read whole and compared; vCenter gone mid-cycle
leaves no half point and the next run finishes the job."""

from __future__ import annotations

import os
import time

from doubles.vcsim_proc import Vcsim
from pyVmomi import vim
from test_physical_to_physical import point_files

from standby.core.config import Policy
from standby.core.errors import StandbyError
from standby.plugins.physical import lab
from standby.plugins.vmware.source import VMwareSource
from support.labenv import Lab, MiB
from support.vmware import CuttingProxy, vmdk_files, write_vc_site


def test_bad_site_input_is_one_line_and_an_exit_code(labenv: Lab, vc: Vcsim) -> None:
    env = labenv
    write_vc_site(env.home, vc, "pinned-wrong", thumbprint="00" * 32)
    write_vc_site(env.home, vc, "bad-password", password_env="STANDBY_TEST_VC_WRONG")
    write_vc_site(env.home, vc, "bad-dc", datacenter="NoSuchDC")
    wrong = {"STANDBY_TEST_VC_WRONG": "not-the-password"}
    for site, code, words in (
        ("pinned-wrong", 2, ["expected 00:00:00", f"seen {vc.thumbprint[:8]}"]),
        ("bad-password", 4, ["login failed", vc.user]),
        ("bad-dc", 3, ["NoSuchDC", vc.datacenter]),
    ):
        r = env.cli("sites", "check", site, env=wrong)
        assert r.returncode == code, (site, r.stderr)
        assert r.stderr.count("\n") == 1 and all(w in r.stderr for w in words), r.stderr
        assert "not-the-password" not in r.stderr and vc.password not in r.stderr
    r = env.cli("sites", "check", "vc", check=True)
    assert "datacenter DC0" in r.stdout


def _vm(env: Lab, index: int) -> tuple[str, str]:
    spec = env.engine.source("vc").list_vms()[index]
    return spec.name, spec.disks[0].name


def test_a_disk_cbt_cannot_track_is_read_whole_and_compared(labenv: Lab, vc: Vcsim) -> None:
    env = labenv
    vm, disk = _vm(env, 1)
    src = env.engine.source("vc")
    assert isinstance(src, VMwareSource)
    obj, _cfg = src._find(vm)
    task = obj.ReconfigVM_Task(spec=vim.vm.ConfigSpec(version="vmx-04"))  # before CBT existed
    while str(task.info.state) not in ("success", "error"):
        time.sleep(0.05)
    assert not src.get_vm(vm).disk(disk).change_tracking
    key = int(disk.removeprefix("disk"))
    vc.write(vm, key, 0, b"\x21" * MiB)
    env.engine.protect(vm, "vc", "dr", Policy())
    assert env.engine.replicate(vm).kind == "full"
    assert not src._find(vm)[0].config.changeTrackingEnabled, "CBT is not switched on for hw 4"
    vc.write(vm, key, 8 * MiB, b"\x22" * 65536)
    again = env.engine.replicate(vm)
    assert again.kind == "hashcompare" and again.bytes_written == 65536
    for d, replica in point_files(env, vm).items():
        assert lab.images_equal(vmdk_files(vc, vm)[d], replica, fmt_a="raw")


def test_vcenter_gone_mid_cycle_leaves_no_half_point(labenv: Lab, vc: Vcsim) -> None:
    env = labenv
    vm, disk = _vm(env, 2)
    key = int(disk.removeprefix("disk"))
    for i in range(0, 48 * MiB, 4 * MiB):
        vc.write(vm, key, i, os.urandom(MiB))
    proxy = CuttingProxy(vc.port, cut_after=6 * MiB)
    write_vc_site(env.home, vc, "vc-flaky", port=proxy.port)
    try:
        env.engine.protect(vm, "vc-flaky", "dr", Policy())
        try:
            env.engine.replicate(vm)
        except StandbyError as exc:
            assert "\n" not in str(exc)
            with env.engine.state.session() as s:
                prot = env.engine.state.protection(s, vm)
                visible = [p for p in prot.points if p.state == "visible"]
            if visible:  # it failed after its point was visible: that point is whole
                for d, replica in point_files(env, vm).items():
                    assert lab.images_equal(vmdk_files(vc, vm)[d], replica, fmt_a="raw")
            env.release()
            env.engine.replicate(vm)  # the next run resumes (or cleans up) and finishes
        assert proxy.cuts == 1, "the connection really was cut"
        for d, replica in point_files(env, vm).items():
            assert lab.images_equal(vmdk_files(vc, vm)[d], replica, fmt_a="raw")
        src = env.engine.source("vc-flaky")
        assert isinstance(src, VMwareSource)
        assert not src._our_snapshots(src._find(vm)[0]), "no standby snapshot is left behind"
    finally:
        proxy.close()
