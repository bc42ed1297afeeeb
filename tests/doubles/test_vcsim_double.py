"""Tests of the vcsim double (tests/doubles/vcsim), driven by pyvmomi as the plugin drives it."""

from __future__ import annotations

import base64
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from doubles.vcsim_proc import Vcsim, start_vcsim

MiB = 1 << 20
PAGE_AREAS = 4
PAGE_BYTES = 16 * MiB


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    vc = start_vcsim(
        tmp_path_factory.mktemp("vcsim"), vms=3, page_areas=PAGE_AREAS, page_bytes=PAGE_BYTES
    )
    try:
        yield vc
    finally:
        vc.stop()


@pytest.fixture(scope="module")
def si(sim: Vcsim) -> Iterator[Any]:
    ctx = ssl.create_default_context(cafile=str(sim.cert))
    conn = SmartConnect(
        host=sim.host, port=sim.port, user=sim.user, pwd=sim.password, sslContext=ctx
    )
    try:
        yield conn
    finally:
        Disconnect(conn)


def vms(si: Any) -> dict[str, Any]:
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return {vm.name: vm for vm in view.view}
    finally:
        view.Destroy()


def disks(config: Any) -> list[Any]:
    return [d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


def wait(task: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while task.info.state not in (vim.TaskInfo.State.success, vim.TaskInfo.State.error):
        assert time.monotonic() < deadline, "task did not finish"
        time.sleep(0.02)
    if task.info.state == vim.TaskInfo.State.error:
        raise task.info.error
    return task.info.result


def snapshot(vm: Any, name: str) -> Any:
    return wait(vm.CreateSnapshot_Task(name=name, memory=False, quiesce=False))


def changed(vm: Any, snap: Any, key: int, change_id: str, capacity: int) -> tuple[list[Any], int]:
    """All changed areas, paging from startOffset + length; returns (areas, calls)."""
    areas: list[Any] = []
    offset, calls = 0, 0
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(
            snapshot=snap, deviceKey=key, startOffset=offset, changeId=change_id
        )
        calls += 1
        assert info.startOffset == offset and info.length > 0
        areas += [(a.start, a.length) for a in info.changedArea]
        offset = info.startOffset + info.length
    return areas, calls


def enable_cbt(vm: Any) -> None:
    wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert vm.config.changeTrackingEnabled


def test_login_and_inventory(sim: Vcsim, si: Any) -> None:
    found = vms(si)
    assert len(found) == 3
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", sim.thumbprint)
    for name, vm in found.items():
        (disk,) = disks(vm.config)
        assert disk.key == 2000
        assert disk.capacityInBytes == disk.capacityInKB * 1024 == 64 * MiB
        assert disk.backing.fileName == f"[{sim.datastore}] {name}/disk1.vmdk"
        (info,) = sim.disks(name)
        assert info["deviceKey"] == disk.key and info["datastorePath"] == disk.backing.fileName
        flat = Path(info["file"])
        assert flat.is_relative_to(sim.dir) and flat.stat().st_size == info["capacityBytes"]
    assert {d.name for d in si.RetrieveContent().rootFolder.childEntity} == {sim.datacenter}


def test_snapshot_shows_change_id(sim: Vcsim, si: Any) -> None:
    vm = vms(si)["DC0_C0_RP0_VM0"]
    (disk,) = disks(vm.config)
    assert disk.backing.changeId is None, "no changeId while CBT is off"
    enable_cbt(vm)
    seq = sim.write(vm.name, disk.key, 0, b"x" * 512)
    snap = snapshot(vm, "s1")
    (sdisk,) = disks(snap.config)
    uuid, n = sdisk.backing.changeId.split("/")
    assert int(n) == seq and len(uuid) == 36
    assert disks(vm.config)[0].backing.changeId == sdisk.backing.changeId
    sim.write(vm.name, disk.key, 512, b"y" * 512)
    assert disks(vm.config)[0].backing.changeId == f"{uuid}/{seq + 1}"
    assert disks(snap.config)[0].backing.changeId == f"{uuid}/{seq}", "snapshot keeps its id"


def test_all_areas_then_exact_incremental(sim: Vcsim, si: Any) -> None:
    vm = vms(si)["DC0_C0_RP0_VM1"]
    enable_cbt(vm)
    (disk,) = disks(vm.config)
    cap = disk.capacityInBytes
    sim.write(vm.name, disk.key, 3 * MiB, b"\x11" * 65536)
    snap1 = snapshot(vm, "full")
    areas, calls = changed(vm, snap1, disk.key, "*", cap)
    assert calls == cap // PAGE_BYTES, "the '*' answer pages by disk range"
    assert areas == [(3 * MiB, 65536)]
    base = disks(snap1.config)[0].backing.changeId

    sim.write(vm.name, disk.key, 5 * MiB, b"\x22" * 4096)
    sim.write(vm.name, disk.key, 40 * MiB + 512, b"\x33" * 1000)  # rounded out to sectors
    snap2 = snapshot(vm, "inc")
    sim.write(vm.name, disk.key, 7 * MiB, b"\x44" * 4096)  # after snap2: not in its answer
    areas, _ = changed(vm, snap2, disk.key, base, cap)
    assert areas == [(5 * MiB, 4096), (40 * MiB + 512, 1024)]
    nothing, _ = changed(vm, snap1, disk.key, base, cap)
    assert nothing == []


def test_many_areas_need_several_calls(sim: Vcsim, si: Any) -> None:
    vm = vms(si)["DC0_C0_RP0_VM1"]
    enable_cbt(vm)
    (disk,) = disks(vm.config)
    base = disks(snapshot(vm, "before").config)[0].backing.changeId
    wanted = [(i * 128 * 1024, 4096) for i in range(10)]  # 10 areas inside the first page
    for start, length in wanted:
        sim.write(vm.name, disk.key, start, b"\x55" * length)
    snap = snapshot(vm, "after")
    first = vm.QueryChangedDiskAreas(
        snapshot=snap, deviceKey=disk.key, startOffset=0, changeId=base
    )
    assert len(first.changedArea) == PAGE_AREAS
    assert first.length == wanted[PAGE_AREAS - 1][0] + 4096, "length ends at the last area"
    areas, calls = changed(vm, snap, disk.key, base, disk.capacityInBytes)
    assert areas == wanted
    assert calls == 3 + disk.capacityInBytes // PAGE_BYTES - 1


def test_stale_change_id_after_reset_is_a_fault(sim: Vcsim, si: Any) -> None:
    vm = vms(si)["DC0_C0_RP0_VM2"]
    enable_cbt(vm)
    (disk,) = disks(vm.config)
    sim.write(vm.name, disk.key, 0, b"z" * 4096)
    old = disks(snapshot(vm, "old").config)[0].backing.changeId
    sim.reset_cbt(vm.name, disk.key)
    snap = snapshot(vm, "new")
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=disk.key, startOffset=0, changeId=old)
    with pytest.raises(vmodl.fault.InvalidArgument):
        vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=disk.key, startOffset=0, changeId="x")
    new = disks(snap.config)[0].backing.changeId
    assert new.split("/")[0] != old.split("/")[0]
    assert (
        vm.QueryChangedDiskAreas(
            snapshot=snap, deviceKey=disk.key, startOffset=0, changeId=new
        ).changedArea
        == []
    )


def test_folder_range_get_needs_session(sim: Vcsim, si: Any) -> None:
    vm = vms(si)["DC0_C0_RP0_VM2"]
    key = disks(vm.config)[0].key
    data = bytes(range(256)) * 16
    sim.write(vm.name, key, 2 * MiB, data)
    url = (
        f"https://{sim.host}:{sim.port}/folder/{vm.name}/disk1-flat.vmdk"
        f"?dcPath={sim.datacenter}&dsName={sim.datastore}"
    )
    ctx = ssl.create_default_context(cafile=str(sim.cert))
    rng = {"Range": f"bytes={2 * MiB + 100}-{2 * MiB + 299}"}
    req = urllib.request.Request(url, headers={"Cookie": si._stub.cookie, **rng})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as res:
        assert res.status == 206
        assert res.read() == data[100:300]
    basic = base64.b64encode(f"{sim.user}:{sim.password}".encode()).decode()
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {basic}", **rng})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as res:
        assert res.status == 206
    for bad in ({}, {"Cookie": 'vmware_soap_session="not-a-session"'}):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(url, headers={**bad, **rng}), context=ctx)
        assert err.value.code == 401


def test_snapshot_removal_reads_like_vsphere(sim: Vcsim, si: Any) -> None:
    vm = vms(si)["DC0_C0_RP0_VM2"]
    snap = snapshot(vm, "gone")
    task = snap.RemoveSnapshot_Task(removeChildren=False)
    wait(task)
    assert task.info.entity == vm, "the front names the VM, not the snapshot"
    wait(vm.RemoveAllSnapshots_Task())
    assert vm.snapshot is None


def test_stop_endpoint_exits_cleanly(tmp_path: Path) -> None:
    vc = start_vcsim(tmp_path, vms=1)
    try:
        req = urllib.request.Request(
            f"https://{vc.host}:{vc.port}/standby/stop", data=b"{}", method="POST"
        )
        ctx = ssl.create_default_context(cafile=str(vc.cert))
        with urllib.request.urlopen(req, context=ctx, timeout=10) as res:
            assert res.status == 200
        assert vc.proc.wait(10) == 0
    finally:
        vc.kill()
