"""KVM -> a directory vault, and out of it to the KVM DR host and to Azure (doubles).

Points are judged byte for byte: a point's disk restored to a raw file (`vault restore-disk`)
against the source disk, a failed-over domain's disk against the source."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_physical_to_azure import latest_point

from standby.core.config import Policy
from standby.core.errors import ConfigError, IntegrityError
from standby.core.state import protection_info
from standby.core.vault.seal import is_sealed, site_sealer
from standby.plugins.physical import lab as lab_mod
from standby.providers.azure import storage
from support.azure import AzureEnv
from support.labenv import Lab, MiB, write_site

PASS = "correct horse battery staple"
ENV = {"SB_VAULT_PASS": PASS}


@pytest.fixture(scope="module")
def lab(labenv: Lab, azenv: AzureEnv) -> Lab:
    os.environ["SB_VAULT_PASS"] = PASS
    write_site(labenv.home, "azure", azenv.site_toml("vaultrun"))
    store = labenv.base / "vstore"
    labenv.cli("vault", "create", "v1", "--store", f"file://{store}", "--passphrase",
               "env:SB_VAULT_PASS", check=True, env=ENV)  # fmt: skip
    write_site(labenv.home, "vlt", 'plugin = "vault"\nvault = "v1"\nrun_on = "dr"\n')
    return labenv


def restored_equals_source(env: Lab, vm: str, disk: str, point: int | None = None) -> bool:
    raw = env.base / f"{vm}-{disk}.restored.raw"
    args = ["vault", "restore-disk", "v1", vm, disk, "--out", str(raw)]
    env.cli(*args, *(["--point", str(point)] if point else []), check=True, env=ENV)
    env.flush(vm, disk)
    try:
        return lab_mod.images_equal(env.disk_path(vm, disk), raw, fmt_b="raw")
    finally:
        raw.unlink()


def vault_ls(env: Lab) -> dict[str, object]:
    data: dict[str, object] = json.loads(env.cli("vault", "ls", "v1", "--json", check=True,
                                                 env=ENV).stdout)  # fmt: skip
    return data


def test_kvm_to_vault_cycles_are_byte_identical_and_deduplicated(lab: Lab) -> None:
    env = lab
    env.create_vm("vt1", [("vda", 40 * MiB, "qcow2"), ("vdb", 8 * MiB + 4096, "qcow2")])
    env.write("vt1", "vda", 1 * MiB, 6 * MiB, 0x11)
    env.write("vt1", "vdb", 0, 256 * 1024, 0x22)
    env.engine.protect("vt1", "src", "vlt", Policy(retain_count=2))
    full = env.engine.replicate("vt1")
    assert full.kind == "full" and full.bytes_read == 6 * MiB + 256 * 1024
    assert restored_equals_source(env, "vt1", "vda") and restored_equals_source(env, "vt1", "vdb")
    first = vault_ls(env)

    env.write("vt1", "vda", 10 * MiB + 65536, 65536, 0x33)
    env.zero("vt1", "vda", 2 * MiB, 65536)
    env.write("vt1", "vdb", 8 * MiB, 4096, 0x44)  # the short last block
    inc = env.engine.replicate("vt1")
    assert inc.kind == "incremental" and inc.bytes_written == 65536 + 4096
    after = vault_ls(env)
    grew = int(str(after["stored_bytes"])) - int(str(first["stored_bytes"]))
    assert grew < 2 * 65536, f"an incremental of 68 KiB stored {grew} bytes"
    assert restored_equals_source(env, "vt1", "vda") and restored_equals_source(env, "vt1", "vdb")

    env.create_vm("vt2", [("vda", 40 * MiB, "qcow2")])  # the same bytes as vt1's first point
    env.write("vt2", "vda", 1 * MiB, 6 * MiB, 0x11)
    env.engine.protect("vt2", "src", "vlt", Policy(retain_count=2))
    env.engine.replicate("vt2")
    dup = vault_ls(env)
    grew = int(str(dup["stored_bytes"])) - int(str(after["stored_bytes"]))
    assert grew < 64 * 1024, f"6 MiB seen before stored {grew} more bytes"
    assert restored_equals_source(env, "vt2", "vda")


def test_points_and_metadata_are_sealed(lab: Lab) -> None:
    store = lab.base / "vstore"
    names = [p for p in store.rglob("*") if p.is_file()]
    assert names and not any("vt1" in str(p) for p in names), "object names leak VM names"
    for p in names:
        if p.name == "vault.json":
            continue
        blob = p.read_bytes()
        assert b"vt1" not in blob and b"vda" not in blob and b"\x11" * 64 not in blob, p
    info = json.loads((store / "vault.json").read_text())
    assert "key" not in json.dumps(info).lower().replace("canary", "")


def test_test_failover_from_the_vault_to_kvm_and_cleanup(lab: Lab) -> None:
    env = lab
    r = env.cli("failover", "vt1", "--test", "--json", check=True, env=ENV)
    data = json.loads(r.stdout)
    assert data["target_vm"] == "vt1-test"
    assert "restoring point" in r.stderr
    dom = env.engine.target("dr").conn.lookupByName("vt1-test")
    assert dom.isActive()
    env.release()
    env.cli("failover", "cleanup", "vt1", check=True, env=ENV)
    names = [d.name() for d in env.engine.target("dr").conn.listAllDomains()]
    assert "vt1-test" not in names
    env.release()


def test_failover_from_the_vault_to_azure(lab: Lab, azenv: AzureEnv) -> None:
    env = lab
    azenv.make_dr_network()
    r = env.cli("vault", "failover", "vt2", "--to", "azure", "--test", "--json",
                check=True, env=ENV)  # fmt: skip
    data = json.loads(r.stdout)
    assert data["target_vm"] == "vt2-test"
    assert set(azenv.arm.resources("vms")) == {"vt2-test"}
    disks = azenv.arm.resources("disks")
    assert len(disks) == 1
    env.cli("failover", "cleanup", "vt2", check=True, env=ENV)
    assert not azenv.arm.resources("vms") and not azenv.arm.resources("disks")


def test_bad_input_changes_nothing(lab: Lab, tmp_path: Path) -> None:
    env = lab
    r = env.cli("vault", "check", "v1", env={"SB_VAULT_PASS": "wrong"})
    assert r.returncode == 4 and r.stderr.strip() == "error: wrong passphrase for vault 'v1'"
    r = env.cli("vault", "ls", "nope", env=ENV)
    assert r.returncode == 3 and "unknown vault 'nope'" in r.stderr
    r = env.cli("vault", "create", "v2", "--store", f"file://{env.base}/vstore",
                "--passphrase", "env:SB_VAULT_PASS", env=ENV)  # fmt: skip
    assert r.returncode == 2 and "not empty" in r.stderr
    assert not (env.home / "vaults" / "v2.toml").exists()
    r = env.cli("vault", "failover", "vt1", "--to", "nosuchsite", "--test", env=ENV)
    assert r.returncode == 3 and "unknown site 'nosuchsite'" in r.stderr


def test_a_new_machine_opens_the_vault_with_the_key_file(lab: Lab, tmp_path: Path) -> None:
    env = lab
    keyfile = tmp_path / "v1.key"
    env.cli("vault", "key", "export", "v1", "--out", str(keyfile), check=True)
    env.cli("vault", "passphrase", "change", "v1", "--new", "env:SB_NEW", check=True,
            env=ENV | {"SB_NEW": "new pass phrase"})  # fmt: skip
    fresh = Path(str(env.home) + "-new")
    shutil.rmtree(fresh, ignore_errors=True)
    dr = (env.home / "sites" / "dr.toml").read_text()
    write_site(fresh, "dr", dr)
    write_site(fresh, "vault", 'plugin = "vault"\nvault = "v1"\nrun_on = "dr"\n')
    new = {"STANDBY_HOME": str(fresh)}
    bad = env.cli("vault", "open", "v1", "--store", f"file://{env.base}/vstore", "--key-file",
                  str(keyfile), "--passphrase", "env:SB_NEW",
                  env=new | {"SB_NEW": "new pass phrase"})  # fmt: skip
    assert bad.returncode == 4, "the exported file still has the old passphrase"
    store = f"file://{env.base}/vstore"
    env.cli("vault", "open", "v1", "--store", store, "--key-file", str(keyfile),
            "--passphrase", "env:SB_VAULT_PASS", check=True, env=new | ENV)  # fmt: skip
    r = env.cli("vault", "import", "v1", "--site", "vault", check=True, env=new | ENV)
    assert "vt1: imported with 2 point(s)" in r.stdout
    r = env.cli("failover", "vt1", "--test", "--json", check=True, env=new | ENV)
    assert json.loads(r.stdout)["target_vm"] == "vt1-test"
    env.cli("failover", "cleanup", "vt1", check=True, env=new | ENV)
    env.cli("vault", "passphrase", "change", "v1", "--passphrase", "env:SB_NEW", "--new",
            "env:SB_VAULT_PASS", check=True, env=ENV | {"SB_NEW": "new pass phrase"})  # fmt: skip


def test_a_flipped_byte_is_found_and_named_and_only_its_points_refuse(lab: Lab) -> None:
    env = lab
    env.create_vm("vt3", [("vda", 8 * MiB, "qcow2")])
    env.write("vt3", "vda", 0, 1 * MiB, 0x77)
    env.engine.protect("vt3", "src", "vlt", Policy(retain_count=2))
    env.engine.replicate("vt3")
    env.release()
    clean = env.cli("vault", "check", "v1", "--read-data", "--json", check=True, env=ENV)
    assert json.loads(clean.stdout)["ok"]
    newest = max((p for p in (env.base / "vstore" / "packs").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_mtime_ns)  # fmt: skip
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    r = env.cli("vault", "check", "v1", "--read-data", "--json", env=ENV)
    assert r.returncode == 9
    rep = json.loads(r.stdout)
    assert any("failed authentication" in p and newest.name in p for p in rep["problems"])
    assert len(rep["damaged_points"]) == 1
    r = env.cli("failover", "vt3", "--test", env=ENV)
    assert r.returncode == 9 and "chunk" in r.stderr and newest.name in r.stderr
    r = env.cli("failover", "cleanup", "vt3", env=ENV)
    point = latest_point(env, "vt1")
    assert point is not None and restored_equals_source(env, "vt1", "vda")


def test_a_kvm_target_naming_the_vault_seals_its_point_records(lab: Lab) -> None:
    env = lab
    dr = (env.home / "sites" / "dr.toml").read_text().replace("/pool", "/spool")
    write_site(env.home, "drs", dr + 'vault = "v1"\n')
    env.create_vm("vt4", [("vda", 8 * MiB, "qcow2")])
    env.write("vt4", "vda", 0, 1 * MiB, 0x41)
    env.engine.protect("vt4", "src", "drs", Policy(retain_count=2))
    env.engine.replicate("vt4")
    point = latest_point(env, "vt4")
    files = list((env.base / "spool").rglob(f"point-{point.id}.sbv"))
    assert len(files) == 1
    blob = files[0].read_bytes()
    assert is_sealed(blob) and b"vt4" not in blob and b"vda" not in blob
    sealer = site_sealer(env.home, "v1")
    assert sealer is not None
    prot = files[0].parent.name.split("-", 1)[0]
    record = sealer.open_json("kvm-point", f"{prot}/{point.id}", blob, str(files[0]))
    assert record["vm"]["name"] == "vt4" and record["ref"] == point.ref
    with pytest.raises(IntegrityError, match="failed authentication"):
        sealer.open_json("kvm-point", f"{prot}/{point.id + 1}", blob, "moved")


def test_an_azure_target_naming_the_vault_seals_its_manifests(lab: Lab, azenv: AzureEnv) -> None:
    env = lab
    write_site(env.home, "azs", azenv.site_toml("sealed", vault="v1"))
    env.create_vm("vt5", [("vda", 8 * MiB, "qcow2")])
    env.write("vt5", "vda", 0, 1 * MiB, 0x45)
    env.engine.protect("vt5", "src", "azs", Policy(retain_count=2))
    env.engine.replicate("vt5")
    env.write("vt5", "vda", 2 * MiB, 65536, 0x46)
    env.engine.replicate("vt5")
    container = env.engine.target("azs").clients.container
    names = [b.name for b in container.list_blobs() if "/points/" in b.name]
    assert len(names) == 2
    for name in names:
        blob = container.download_blob(name).readall()
        assert is_sealed(blob) and b"vt5" not in blob and b"snapshot" not in blob
    env.release()
    r = env.cli("failover", "vt5", "--test", "--json", check=True, env=ENV)
    assert json.loads(r.stdout)["target_vm"] == "vt5-test"
    env.cli("failover", "cleanup", "vt5", check=True, env=ENV)
    point = latest_point(env, "vt5")
    with env.engine.state.session() as s:
        pinfo = protection_info(env.engine.state.protection(s, "vt5"))
    container = env.engine.target("azs").clients.container
    with pytest.raises(ConfigError, match="sealed with a vault key"):  # without the vault's key
        storage.read_manifest(container, pinfo, point.id, None)
