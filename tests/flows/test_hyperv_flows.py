"""Hyper-V (the WinRM double, VHDX files served by Samba) -> KVM and -> Azure: every point
checked byte for byte against the VHDX as qemu-img reads it; RCT incrementals and an RCT
reset; a drill and a planned failover; the host gone mid-cycle; bad site input."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_physical_to_azure import latest_point
from test_physical_to_physical import point_files

from standby.core.config import Policy
from standby.core.errors import StandbyError
from standby.plugins.physical import lab
from standby.providers.azure import vhd
from support.azure import AzureEnv
from support.hyperv import HyperVLab, start_hyperv
from support.labenv import Lab, MiB, write_site


@pytest.fixture(scope="module")
def hv(
    labenv: Lab, azenv: AzureEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HyperVLab]:
    host = start_hyperv(tmp_path_factory.mktemp("hv"))
    for name in ("app01", "db01", "file01", "web01"):
        host.model.add_vm(name, [24, 8] if name == "db01" else [24])
    host.write_site(labenv.home, "hv")
    write_site(labenv.home, "azure", azenv.site_toml("replicas"))
    try:
        yield host
    finally:
        labenv.release()
        host.stop()


def vhdx_of(hv: HyperVLab, vm: str) -> dict[str, Path]:
    return {d.name: d.path for d in hv.model.vms[vm].disks}


def assert_replica_equals_vhdx(env: Lab, hv: HyperVLab, vm: str) -> None:
    files = vhdx_of(hv, vm)
    replicas = point_files(env, vm)
    assert set(replicas) == set(files)
    for disk, replica in replicas.items():
        assert lab.images_equal(files[disk], replica, fmt_a="vhdx"), f"{vm}/{disk} differs"


def assert_azure_point_equals_vhdx(env: Lab, hv: HyperVLab, vm: str, tmp: Path) -> None:
    point = latest_point(env, vm)
    container = env.engine.target("azure").clients.container  # type: ignore[attr-defined]
    for disk, path in vhdx_of(hv, vm).items():
        raw = tmp / f"{vm}-{disk}.raw"
        subprocess.run(
            ["qemu-img", "convert", "-U", "-f", "vhdx", "-O", "raw", str(path), str(raw)],
            check=True,
        )
        blob = container.get_blob_client(
            point.ref["blobs"][disk], snapshot=point.ref["snapshots"][disk]
        )
        data = blob.download_blob(max_concurrency=4).readall()
        assert data[: -vhd.FOOTER] == raw.read_bytes(), f"Azure point of {vm}/{disk} differs"
        raw.unlink()


def test_hyperv_to_kvm_full_rct_incremental_and_rct_reset(labenv: Lab, hv: HyperVLab) -> None:
    env = labenv
    host = hv.model
    host.guest_write("db01", 0, 1 * MiB, bytes(range(256)) * 1024)
    host.guest_write("db01", 1, 0, b"\x11" * 65536)
    env.engine.protect("db01", "hv", "dr", Policy(retain_count=3))
    full = env.engine.replicate("db01")
    assert full.kind == "full"
    assert_replica_equals_vhdx(env, hv, "db01")

    host.guest_write("db01", 0, 3 * MiB, b"\x33" * 65536)
    host.guest_write("db01", 1, 5 * MiB, b"\x55" * 4096)
    inc = env.engine.replicate("db01")
    assert inc.kind == "incremental"
    assert inc.bytes_read <= 2 * 65536 + 65536, "RCT: only the changed ranges are read"
    assert_replica_equals_vhdx(env, hv, "db01")

    host.reset_rct("db01", 0)  # a live migration: the RCT id standby holds is refused
    host.guest_write("db01", 0, 7 * MiB, b"\x77" * 65536)
    after = env.engine.replicate("db01")
    assert any("change tracking cannot answer" in n for n in after.notes), after.notes
    assert after.bytes_written == 65536, "the full read is compared: only the change ships"
    assert_replica_equals_vhdx(env, hv, "db01")
    assert not host.vms["db01"].checkpoints, "no standby checkpoint is left behind"


def test_hyperv_to_kvm_drill_then_planned_failover(labenv: Lab, hv: HyperVLab) -> None:
    env = labenv
    host = hv.model
    host.guest_write("app01", 0, 2 * MiB, b"\x21" * 65536)
    env.engine.protect("app01", "hv", "dr", Policy(shutdown_timeout_seconds=5))
    env.engine.replicate("app01")
    host.guest_write("app01", 0, 9 * MiB, b"\x99" * 65536)  # after the point: not in the drill
    fo = env.lifecycle.failover("app01", test=True)
    assert fo.state == "running" and env.dr.lookupByName(fo.vm_name).isActive()
    disk = next(iter(vhdx_of(hv, "app01")))
    assert lab.has_pattern(Path(fo.ref["dir"]) / f"{disk}.qcow2", 9 * MiB, 65536, 0x00)
    env.lifecycle.cleanup("app01")
    assert host.vms["app01"].state == "Running", "a drill leaves the source alone"

    planned = env.lifecycle.failover("app01", kind="planned")
    assert planned.kind == "planned" and planned.data_loss_seconds == 0
    assert host.vms["app01"].state == "Off", "the source VM was shut down through Hyper-V"
    assert lab.has_pattern(Path(planned.ref["dir"]) / f"{disk}.qcow2", 9 * MiB, 65536, 0x99)
    env.lifecycle.commit("app01")


def test_hyperv_to_azure_cycles_match_the_vhdx(
    labenv: Lab, hv: HyperVLab, azenv: AzureEnv, tmp_path: Path
) -> None:
    env = labenv
    host = hv.model
    host.guest_write("web01", 0, 0, b"\x5a" * (512 * 1024))
    env.engine.protect("web01", "hv", "azure", Policy(retain_count=2))
    assert env.engine.replicate("web01").kind == "full"
    assert_azure_point_equals_vhdx(env, hv, "web01", tmp_path)
    host.guest_write("web01", 0, 6 * MiB, b"\x66" * 65536)
    inc = env.engine.replicate("web01")
    assert inc.kind == "incremental" and inc.bytes_written == 65536
    assert_azure_point_equals_vhdx(env, hv, "web01", tmp_path)
    env.release()
    r = env.cli("failover", "web01", "--test", "--json", check=True)
    assert "web01" in r.stdout
    env.cli("failover", "cleanup", "web01", check=True)
    assert not azenv.arm.resources("vms")


def test_host_gone_mid_cycle_leaves_no_half_point(labenv: Lab, hv: HyperVLab) -> None:
    env = labenv
    host = hv.model
    host.guest_write("file01", 0, 0, b"\x01" * MiB)
    env.engine.protect("file01", "hv", "dr", Policy())
    env.engine.replicate("file01")
    host.guest_write("file01", 0, 4 * MiB, b"\x04" * MiB)
    with env.engine.state.session() as s:
        before = len(env.engine.state.protection(s, "file01").points)
    host.fail_next.append("checkpoint")
    with pytest.raises(StandbyError) as err:
        env.engine.replicate("file01")
    assert "\n" not in str(err.value) and "WS-Management" in str(err.value)
    with env.engine.state.session() as s:
        points = env.engine.state.protection(s, "file01").points
        assert len([p for p in points if p.state == "visible"]) == before, "no half point"
    again = env.engine.replicate("file01")  # the next run finishes the job
    assert again.bytes_written == MiB
    assert_replica_equals_vhdx(env, hv, "file01")

    host.guest_write("file01", 0, 8 * MiB, b"\x08" * 65536)
    host.fail_next.append("remove-checkpoint")  # gone as the cycle ends: the point stands
    env.engine.replicate("file01")
    assert_replica_equals_vhdx(env, hv, "file01")
    assert len(host.vms["file01"].checkpoints) == 1, "the host could not be told"
    env.engine.replicate("file01")
    assert not host.vms["file01"].checkpoints, "the next cycle removed the stale checkpoint"


def test_bad_site_input_is_one_line_and_an_exit_code(labenv: Lab, hv: HyperVLab) -> None:
    env = labenv
    hv.write_site(env.home, "hv-badpw", password="env:STANDBY_TEST_HV_WRONG")
    hv.write_site(env.home, "hv-unpinned", ca_file=None)
    wrong = {"STANDBY_TEST_HV_WRONG": "not-the-password"}
    r = env.cli("sites", "check", "hv-badpw", env=wrong)
    assert r.returncode == 4 and r.stderr.count("\n") == 1, r.stderr
    assert "not-the-password" not in r.stderr
    r = env.cli("sites", "check", "hv-unpinned")
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    r = env.cli("protect", "nosuchvm", "--from", "hv", "--to", "dr")
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert "nosuchvm" in r.stderr
    r = env.cli("sites", "check", "hv", check=True)
    assert "4 VMs to protect" in r.stdout


def test_a_generation_2_vm_to_a_host_without_uefi_is_refused_at_protect(
    labenv: Lab, hv: HyperVLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DR host whose libvirt offers no UEFI firmware (no OVMF installed there): the
    generation 2 VM is refused in one line and nothing is recorded."""
    env = labenv
    dr = env.engine.target("dr")
    no_efi = (
        "<domainCapabilities><os supported='yes'><enum name='firmware'/></os></domainCapabilities>"
    )
    monkeypatch.setattr(dr.conn, "getDomainCapabilities", lambda *a: no_efi)  # type: ignore[attr-defined]
    hv.model.add_vm("gen2vm", [8], generation=2)
    with pytest.raises(StandbyError, match="UEFI") as err:
        env.engine.protect("gen2vm", "hv", "dr", Policy())
    assert "\n" not in str(err.value) and "generation 2" in str(err.value)
    with env.engine.state.session() as s, pytest.raises(StandbyError):
        env.engine.state.protection(s, "gen2vm")
    del hv.model.vms["gen2vm"]
