"""VMM clouds (a VMM double over two Hyper-V host doubles, one geo-clustered VMM managing both
sites): a whole cloud protected with one command, VMM cloud -> VMM cloud cycles judged byte
for byte against the source VHDX, a drill and a planned failover placed on the DR cloud's
host and adopted into its cloud on the mapped VM network, failback onto the original VM; and
VMM cloud -> Azure."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from doubles.hyperv_host import Nic
from doubles.vmm import Cloud
from test_hyperv_flows import assert_azure_point_equals_vhdx

from standby.core.config import Policy
from support.azure import AzureEnv
from support.hyperv import VmmLab, start_hyperv, start_vmm
from support.labenv import Lab, MiB, write_site

POLICY = Policy(shutdown_timeout_seconds=1, retain_count=3)
PROD, DR = "hv-a.corp", "hv-b.corp"


@pytest.fixture(scope="module")
def vmm(labenv: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmmLab]:
    a = start_hyperv(tmp_path_factory.mktemp("hva"), env_prefix="STANDBY_TEST_HVA")
    b = start_hyperv(tmp_path_factory.mktemp("hvb"), env_prefix="STANDBY_TEST_HVB")
    clouds = {"Gold": Cloud([PROD], ["Prod"]), "DR": Cloud([DR], ["DR-Prod"])}
    server = start_vmm(tmp_path_factory.mktemp("vmm"), {PROD: a, DR: b}, clouds)
    for name, disks in (("sql01", [16, 8]), ("app02", [16])):
        vm = a.model.add_vm(name, disks)
        vm.nics.append(Nic("nic0", f"00155D0A0B0{len(a.model.vms)}", "LAN"))
        server.model.nic_network[(vm.id, server.model.mac(vm.nics[0].mac))] = "Prod"
    server.write_site(labenv.home, "vmm-prod", "Gold", switch="LAN",
                      networks={"DR-Prod": "Prod"})  # fmt: skip
    server.write_site(labenv.home, "vmm-dr", "DR", switch="LAN", networks={"Prod": "DR-Prod"})
    labenv.release()
    try:
        yield server
    finally:
        labenv.release()
        server.stop()
        a.stop()
        b.stop()


def raw(path: Path, tmp: Path) -> bytes:
    out = tmp / "x.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "vhdx", "-O", "raw", str(path), str(out)],
                   check=True)  # fmt: skip
    data = out.read_bytes()
    out.unlink()
    return data


def latest_files(env: Lab, vm: str) -> dict[str, str]:
    with env.engine.state.session() as s:
        prot = env.engine.state.protection(s, vm)
        return dict([p for p in prot.points if p.state == "visible"][-1].ref["files"])


def test_a_cloud_protected_in_one_command_then_drill_failover_and_failback(
    labenv: Lab, vmm: VmmLab, tmp_path: Path
) -> None:
    env = labenv
    a, b = vmm.hosts[PROD], vmm.hosts[DR]
    a.model.guest_write("sql01", 0, 0, b"\x51" * MiB)
    a.model.guest_write("sql01", 1, 3 * MiB, b"\x52" * 65536)
    a.model.guest_write("app02", 0, MiB, b"\x61" * (2 * MiB))

    r = env.cli("protect", "--all", "--from", "vmm-prod", "--to", "vmm-dr", check=True)
    assert "vmm-prod: 2 protected, 0 already protected, 0 refused" in r.stdout, r.stdout
    r = env.cli("protect", "--all", "--from", "vmm-prod", "--to", "vmm-dr", check=True)
    assert "vmm-prod: 0 protected, 2 already protected, 0 refused" in r.stdout, r.stdout
    e, life = env.engine, env.lifecycle

    def assert_points_equal_source(vm: str) -> None:
        files = latest_files(env, vm)
        for d in a.model.vms[vm].disks:
            assert b.chain_bytes(files[d.name]) == raw(d.path, tmp_path), f"{vm}/{d.name}"

    for vm in ("sql01", "app02"):
        assert e.replicate(vm).kind == "full"
        assert_points_equal_source(vm)
    a.model.guest_write("app02", 0, 7 * MiB, b"\x67" * 65536)
    inc = e.replicate("app02")
    assert inc.kind == "incremental" and inc.bytes_written == 65536
    assert_points_equal_source("app02")

    # a drill: placed on the DR cloud's host, in its cloud, on no VM network
    life.failover("sql01", kind="test")
    test_vm = b.model.vms["sql01-test"]
    assert test_vm.state == "Running" and vmm.model.vm_cloud[test_vm.id] == "DR"
    assert [n.switch for n in test_vm.nics] == ["standby-test"]
    life.cleanup("sql01")
    assert "sql01-test" not in b.model.vms

    # planned: the VM comes up on hv-b, in cloud DR, on VM network DR-Prod
    planned = life.failover("app02", kind="planned")
    assert planned.data_loss_seconds == 0 and a.model.vms["app02"].state == "Off"
    at_dr = b.model.vms["app02"]
    assert at_dr.state == "Running" and vmm.model.vm_cloud[at_dr.id] == "DR"
    assert vmm.model.nic_network[(at_dr.id, vmm.model.mac(at_dr.nics[0].mac))] == "DR-Prod"
    life.commit("app02")
    life.reprotect("app02")  # cloud DR -> cloud Gold, seeded from the original VHDX on hv-a
    b.model.guest_write("app02", 0, 9 * MiB, b"\x99" * 65536)
    back = e.replicate("app02")
    assert back.bytes_written == 65536, "only what the VM wrote at the DR site travels back"

    fb = life.failback("app02")
    assert fb.kind == "planned"
    home = a.model.vms["app02"]
    assert home.state == "Running" and b.model.vms["app02"].state == "Off"
    got = a.chain_bytes(a.model.winpath(home.disks[0].path))
    assert got == b.chain_bytes(b.model.winpath(at_dr.disks[0].path))
    assert got[9 * MiB : 9 * MiB + 65536] == b"\x99" * 65536
    assert vmm.model.nic_network[(home.id, vmm.model.mac(home.nics[0].mac))] == "Prod"


def test_a_vmm_cloud_to_azure(labenv: Lab, vmm: VmmLab, azenv: AzureEnv, tmp_path: Path) -> None:
    env = labenv
    a = vmm.hosts[PROD]
    a.model.add_vm("web03", [16])
    a.model.guest_write("web03", 0, 0, b"\x33" * (512 * 1024))
    write_site(env.home, "azure", azenv.site_toml("replicas"))
    env.release()
    env.engine.protect("web03", "vmm-prod", "azure", Policy(retain_count=2))
    assert env.engine.replicate("web03").kind == "full"
    assert_azure_point_equals_vhdx(env, a, "web03", tmp_path)
    a.model.guest_write("web03", 0, 4 * MiB, b"\x34" * 65536)
    assert env.engine.replicate("web03").bytes_written == 65536
    assert_azure_point_equals_vhdx(env, a, "web03", tmp_path)


def test_bad_vmm_input_is_one_line(labenv: Lab, vmm: VmmLab) -> None:
    env = labenv
    vmm.write_site(env.home, "vmm-nocloud", "Platinum")
    r = env.cli("sites", "check", "vmm-nocloud")
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert "Cloud" in r.stderr and "Error ID" in r.stderr
    r = env.cli("protect", "nosuch", "--from", "vmm-prod", "--to", "vmm-dr")
    assert r.returncode == 3 and "nosuch" in r.stderr, r.stderr
