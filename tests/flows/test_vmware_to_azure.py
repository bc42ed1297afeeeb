"""vSphere (the vcsim double) -> Azure (Azurite + the fake ARM): the seed's most used flow.
Points checked byte for byte against the VMDK's backing file; a drill through the CLI; a
planned failover (guest shut down through vSphere, zero loss), its commit, re-protect back to
the vCenter seeded from the original disks, and failback onto the original VM."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pytest
from doubles.vcsim_proc import Vcsim, start_vcsim
from test_physical_to_azure import _managed_disk, latest_point

from standby.core.config import Policy
from standby.plugins.physical import lab as lab_mod
from standby.providers.azure import vhd
from support.azure import AzureEnv
from support.labenv import Lab, MiB, write_site
from support.vmware import vmdk_files, write_vc_site


@pytest.fixture(scope="module")
def lab(labenv: Lab, azenv: AzureEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    sim = start_vcsim(tmp_path_factory.mktemp("vcsim"), vms=2)
    write_site(labenv.home, "azure", azenv.site_toml("replicas"))
    # the vCenter is also where failback lands: a datastore standby reaches as files
    # (and the Azure subnet maps back to the VMs' port group)
    write_vc_site(
        labenv.home,
        sim,
        datastore=sim.datastore,
        datastore_path=str(sim.datastore_dir),
        networks={"default": "DC0_DVPG0"},
    )
    labenv.vc = sim  # type: ignore[attr-defined]
    try:
        yield labenv
    finally:
        labenv.release()
        sim.stop()


def vc(env: Lab) -> Vcsim:
    return env.vc  # type: ignore[attr-defined,no-any-return]


def assert_point_equals_vmdk(env: Lab, vm: str) -> None:
    point = latest_point(env, vm)
    container = env.engine.target("azure").clients.container  # type: ignore[attr-defined]
    for disk, flat in vmdk_files(vc(env), vm).items():
        blob = container.get_blob_client(
            point.ref["blobs"][disk], snapshot=point.ref["snapshots"][disk]
        )
        data = blob.download_blob(max_concurrency=4).readall()
        assert data[: -vhd.FOOTER] == flat.read_bytes(), f"point of {vm}/{disk} differs"


def vm_and_disk(env: Lab, index: int) -> tuple[str, str]:
    spec = env.engine.source("vc").list_vms()[index]
    return spec.name, spec.disks[0].name


def test_vmware_to_azure_cycles_match_the_vmdk(lab: Lab) -> None:
    env = lab
    vm, disk = vm_and_disk(env, 0)
    key = int(disk.removeprefix("disk"))
    rng = random.Random(5)
    vc(env).write(vm, key, 0, rng.randbytes(512 * 1024))
    vc(env).write(vm, key, 40 * MiB, b"\x44" * MiB)
    env.engine.protect(vm, "vc", "azure", Policy(retain_count=2))
    full = env.engine.replicate(vm)
    assert full.kind == "full"
    assert_point_equals_vmdk(env, vm)
    vc(env).write(vm, key, 2 * MiB, rng.randbytes(65536))
    inc = env.engine.replicate(vm)
    assert inc.kind == "incremental" and inc.bytes_written == 65536
    assert_point_equals_vmdk(env, vm)


def test_drill_through_the_cli(lab: Lab, azenv: AzureEnv) -> None:
    env = lab
    vm, _disk = vm_and_disk(env, 0)
    env.release()
    r = env.cli("failover", vm, "--test", "--json", check=True)
    data = json.loads(r.stdout)
    assert data["target_vm"] in azenv.arm.resources("vms")
    env.cli("failover", "cleanup", vm, check=True)
    assert not azenv.arm.resources("vms") and not azenv.arm.resources("disks")


def test_planned_failover_to_azure_loses_nothing(lab: Lab, azenv: AzureEnv) -> None:
    env = lab
    azenv.make_dr_network()
    vm, disk = vm_and_disk(env, 1)
    key = int(disk.removeprefix("disk"))
    env.engine.protect(vm, "vc", "azure", Policy(shutdown_timeout_seconds=5))
    env.engine.replicate(vm)
    vc(env).write(vm, key, 5 * MiB, b"\x77" * 65536)  # just before the failover
    fo = env.lifecycle.failover(vm, kind="planned")
    assert fo.kind == "planned" and fo.data_loss_seconds == 0
    assert fo.vm_name == vm.replace("_", "-"), "Azure names: the VM's name, made valid"
    assert env.engine.source("vc").get_vm(vm).power_state == "shutoff"
    at_azure = azenv.arm.disk_data(_managed_disk(azenv.arm, vm.replace("_", "-"), disk))
    assert at_azure.download_blob(offset=5 * MiB, length=65536).readall() == b"\x77" * 65536
    env.lifecycle.commit(vm)

    # Azure -> vSphere: re-protect seeded from the original VMDK, then fail back onto it
    env.lifecycle.reprotect(vm)
    at_azure.upload_page(b"\x99" * 65536, offset=9 * MiB, length=65536)
    first = env.engine.replicate(vm)
    assert first.kind == "hashcompare"
    assert first.bytes_written == 65536, "only the block written in Azure travels back"
    fb = env.lifecycle.failback(vm)
    assert fb.kind == "planned" and fb.vm_name == vm
    src = env.engine.source("vc")
    assert src.get_vm(vm).power_state == "running", "the original VM runs again"
    home = vmdk_files(vc(env), vm)[disk]
    assert lab_mod.has_pattern(home, 9 * MiB, 65536, 0x99, fmt="raw"), "the Azure write came home"
    assert lab_mod.has_pattern(home, 5 * MiB, 65536, 0x77, fmt="raw")
    env.lifecycle.commit(vm)
