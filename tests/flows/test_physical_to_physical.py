"""physical -> physical: cycles on real embedded libvirt hosts, checked byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from standby.core.config import Policy
from standby.core.errors import CapabilityNotSupported, ConfigError, NotFound, TransientError
from standby.core.state import RecoveryPoint
from standby.plugins.physical import lab
from support.labenv import Lab, MiB


def point_files(env: Lab, vm: str) -> dict[str, Path]:
    with env.engine.state.session() as s:
        prot = env.engine.state.protection(s, vm)
        point = s.scalars(
            select(RecoveryPoint)
            .where(RecoveryPoint.protection_id == prot.id, RecoveryPoint.state == "visible")
            .order_by(RecoveryPoint.id.desc())
        ).first()
        assert point is not None
        return {d: Path(f) for d, f in point.ref["files"].items()}


def assert_point_equals_source(env: Lab, vm: str, disks: list[str], fmt: str = "qcow2") -> None:
    for dev, path in point_files(env, vm).items():
        assert dev in disks
        env.flush(vm, dev)
        assert lab.images_equal(env.disk_path(vm, dev, fmt), path, fmt_a=fmt), (
            f"point of {vm}/{dev} differs from the source"
        )


def test_cycles_are_byte_identical_and_incremental_reads_only_changes(labenv: Lab) -> None:
    env = labenv
    env.create_vm("flow1", [("vda", 64 * MiB, "qcow2"), ("vdb", 32 * MiB, "qcow2")])
    env.write("flow1", "vda", 1 * MiB, 4 * MiB, 0x11)
    env.write("flow1", "vdb", 0, 512 * 1024, 0x22)
    env.engine.protect("flow1", "src", "dr", Policy(retain_count=3))

    full = env.engine.replicate("flow1")
    assert full.kind == "full"
    assert full.bytes_read == 4 * MiB + 512 * 1024  # holes and zeroes are never read
    assert_point_equals_source(env, "flow1", ["vda", "vdb"])

    # Three 64 KiB writes (one rewrites the same bytes) and a zeroed range.
    env.write("flow1", "vda", 10 * MiB, 65536, 0x33)
    env.write("flow1", "vdb", 20 * MiB, 65536, 0x44)
    env.write("flow1", "vda", 1 * MiB, 65536, 0x11)
    env.zero("flow1", "vda", 2 * MiB, 65536)
    inc = env.engine.replicate("flow1")
    assert inc.kind == "incremental"
    assert inc.bytes_read == 4 * 65536, "an incremental cycle reads exactly the changed blocks"
    assert inc.bytes_written == 2 * 65536  # the identical rewrite is not shipped
    assert inc.bytes_zeroed == 65536
    assert_point_equals_source(env, "flow1", ["vda", "vdb"])

    idle = env.engine.replicate("flow1")
    assert idle.bytes_read == 0 and idle.bytes_written == 0
    assert_point_equals_source(env, "flow1", ["vda", "vdb"])

    # Grow vda by 16 MiB and write into the new space.
    dom = env.src.lookupByName("flow1")
    dom.blockResize("vda", 80 * MiB, 1)  # 1 = VIR_DOMAIN_BLOCK_RESIZE_BYTES
    env.write("flow1", "vda", 70 * MiB, 65536, 0x55)
    grown = env.engine.replicate("flow1")
    assert grown.bytes_read == 65536
    files = point_files(env, "flow1")
    assert lab.has_pattern(files["vda"], 70 * MiB, 65536, 0x55)
    assert_point_equals_source(env, "flow1", ["vda", "vdb"])

    with env.engine.state.session() as s:
        prot = env.engine.state.protection(s, "flow1")
        visible = [p for p in prot.points if p.state == "visible"]
        assert len(visible) == 3, "retention keeps 3 points"
        assert all(d.digest for p in visible for d in p.disks)


def test_raw_disk_falls_back_to_hash_compare(labenv: Lab) -> None:
    env = labenv
    env.create_vm("rawvm", [("vda", 32 * MiB, "raw")])
    env.write("rawvm", "vda", 0, 2 * MiB, 0x61)
    env.engine.protect("rawvm", "src", "dr", Policy())
    first = env.engine.replicate("rawvm")
    assert first.kind == "full"
    assert any("hash-compare" in n for n in first.notes)
    env.write("rawvm", "vda", 8 * MiB, 65536, 0x62)
    second = env.engine.replicate("rawvm")
    assert second.kind == "hashcompare"
    assert second.bytes_written == 65536, "only blocks whose checksum changed are shipped"
    assert_point_equals_source(env, "rawvm", ["vda"], fmt="raw")


def test_disk_too_large_for_the_pool_is_refused_at_protect(labenv: Lab) -> None:
    env = labenv
    env.create_vm(
        "huge",
        [("vda", 100 << 40, "qcow2")],
    )
    with pytest.raises(CapabilityNotSupported) as exc:
        env.engine.protect("huge", "src", "dr", Policy())
    assert "vda" in str(exc.value) and "free" in str(exc.value)
    with env.engine.state.session() as s:
        from standby.core.state import Protection

        assert s.scalars(select(Protection).where(Protection.vm_name == "huge")).first() is None


def test_test_failover_is_isolated_and_cleanup_removes_everything(labenv: Lab) -> None:
    env = labenv
    env.create_vm("fo1", [("vda", 32 * MiB, "qcow2")])
    env.write("fo1", "vda", 0, 1 * MiB, 0x71)
    env.engine.protect("fo1", "src", "dr", Policy())
    env.engine.replicate("fo1")
    env.write("fo1", "vda", 4 * MiB, 65536, 0x72)  # after the point: must not show
    fo = env.lifecycle.failover("fo1", test=True)
    assert fo.state == "running"
    dom = env.dr.lookupByName(fo.vm_name)
    assert dom.isActive()
    xml = dom.XMLDesc(0)
    assert "type='udp'" in xml and "127.0.0.1" in xml, "test NICs have no uplink"
    assert env.src.lookupByName("fo1").isActive(), "the source keeps running"
    disk = Path(fo.ref["dir"]) / "vda.qcow2"
    assert lab.has_pattern(disk, 0, 1 * MiB, 0x71)
    assert lab.has_pattern(disk, 4 * MiB, 65536, 0x00)
    before = set(d.name() for d in env.dr.listAllDomains())
    env.lifecycle.cleanup("fo1")
    after = set(d.name() for d in env.dr.listAllDomains())
    assert fo.vm_name in before and fo.vm_name not in after
    assert not Path(fo.ref["dir"]).exists()
    # Replication goes on after the drill.
    assert env.engine.replicate("fo1").bytes_read == 65536


def test_failover_to_a_chosen_older_point(labenv: Lab) -> None:
    env = labenv
    env.create_vm("fo2", [("vda", 16 * MiB, "qcow2")])
    env.write("fo2", "vda", 0, MiB, 0x81)
    env.engine.protect("fo2", "src", "dr", Policy())
    older = env.engine.replicate("fo2").point_id
    env.write("fo2", "vda", 0, MiB, 0x82)
    env.engine.replicate("fo2")
    with pytest.raises(NotFound, match="recovery point 999999"):
        env.lifecycle.failover("fo2", test=True, point_id=999999)
    fo = env.lifecycle.failover("fo2", test=True, point_id=older)
    assert fo.point_id == older
    assert lab.has_pattern(Path(fo.ref["dir"]) / "vda.qcow2", 0, MiB, 0x81)
    with pytest.raises(ConfigError, match="has a test failover running"):
        env.lifecycle.failover("fo2", test=True)
    env.lifecycle.cleanup("fo2")
    with pytest.raises(NotFound, match="no test failover"):
        env.lifecycle.cleanup("fo2")


def test_unprotect_removes_replicas_checkpoints_and_state(labenv: Lab) -> None:
    env = labenv
    env.create_vm("un1", [("vda", 16 * MiB, "qcow2")])
    env.write("un1", "vda", 0, MiB, 0x91)
    env.engine.protect("un1", "src", "dr", Policy())
    env.engine.replicate("un1")
    env.engine.replicate("un1")
    files = point_files(env, "un1")
    dom = env.src.lookupByName("un1")
    assert [c.getName() for c in dom.listAllCheckpoints()]
    fo = env.lifecycle.failover("un1", test=True)
    with pytest.raises(ConfigError, match="failover cleanup"):
        env.engine.unprotect("un1")
    env.lifecycle.cleanup("un1")
    assert fo.vm_name not in {d.name() for d in env.dr.listAllDomains()}
    assert env.engine.unprotect("un1") == 2
    assert not any(p.exists() for p in files.values())
    assert dom.listAllCheckpoints() == []
    appliance = f"standby-replica-{fo.protection_id}"
    assert appliance not in {d.name() for d in env.dr.listAllDomains()}
    with pytest.raises(NotFound):
        env.engine.replicate("un1")
    # It can be protected again from scratch.
    env.engine.protect("un1", "src", "dr", Policy())
    assert env.engine.replicate("un1").kind == "full"


def test_default_verify_proves_every_write_and_samples_content(labenv: Lab) -> None:
    """verify = auto on this target: the overlay's allocation map accounts for every write,
    and 16 pieces are read back; a dropped or a stray write fails the cycle, no point is
    made, and the next cycle repairs it."""
    from standby.plugins.physical.target import PhysicalWriter

    env = labenv
    env.create_vm("prf1", [("vda", 128 * MiB, "qcow2")])
    env.write("prf1", "vda", 0, 80 * MiB, 0x61)  # 20 pieces of 4 MiB
    env.engine.protect("prf1", "src", "dr", Policy())
    full = env.engine.replicate("prf1")
    (note,) = [n for n in full.notes if n.startswith("verify:")]
    assert "allocation map" in note
    assert f"{16 * 4 * MiB} of {80 * MiB} written bytes read back" in note
    assert_point_equals_source(env, "prf1", ["vda"])

    real_write, real_many = PhysicalWriter.write, PhysicalWriter.write_many
    calls = {"n": 0}

    def dropping(self: PhysicalWriter, disk: str, pieces: list[tuple[int, object]]) -> None:
        kept = []
        for offset, data in pieces:
            calls["n"] += 1
            if calls["n"] != 2:  # the second write never reaches the replica
                kept.append((offset, data))
        real_many(self, disk, kept)  # type: ignore[arg-type]

    def straying(self: PhysicalWriter, disk: str, pieces: list[tuple[int, object]]) -> None:
        real_many(self, disk, pieces)  # type: ignore[arg-type]
        real_write(self, disk, 120 * MiB, b"\x99" * 65536)  # and a block nobody asked for

    for round_, fault in enumerate((dropping, straying)):
        for i in range(8):
            env.write("prf1", "vda", i * 8 * MiB, 65536, 0x70 + 8 * round_ + i)
        PhysicalWriter.write_many = fault  # type: ignore[method-assign,assignment]
        try:
            with pytest.raises(TransientError, match="verification failed"):
                env.engine.replicate("prf1")
        finally:
            PhysicalWriter.write_many = real_many  # type: ignore[method-assign]
        repaired = env.engine.replicate("prf1")
        assert repaired.resumed
        assert_point_equals_source(env, "prf1", ["vda"])
        assert not lab.has_pattern(point_files(env, "prf1")["vda"], 120 * MiB, 65536, 0x99)


def test_a_kvm_replicate_loads_only_what_it_uses(labenv: Lab) -> None:
    """`standby replicate VM --json` of a KVM VM imports no Azure SDK, no rich, no plan or
    lifecycle code, no keyring and no Alembic (the schema is current)."""
    import os
    import subprocess

    from support.labenv import STANDBY

    env = labenv
    env.create_vm("imp1", [("vda", 16 * MiB, "qcow2")])
    env.write("imp1", "vda", 0, MiB, 0x5A)
    env.cli("protect", "imp1", "--from", "src", "--to", "dr", check=True)
    env.release()
    # The CLI's own path without its quick exit (os._exit would drop the last lines).
    run = "import sys; from standby.core.entry import _run; sys.exit(_run())"
    proc = subprocess.run(
        [STANDBY[0], "-X", "importtime", "-c", run, "replicate", "imp1", "--json"],
        env={**os.environ, "STANDBY_HOME": str(env.home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = {
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    for unwanted in ("azure", "rich", "alembic", "keyring", "standby.providers.azure",
                     "standby.core.plans", "standby.core.lifecycle", "mako"):  # fmt: skip
        found = sorted(m for m in loaded if m == unwanted or m.startswith(unwanted + "."))
        assert not found, f"{unwanted} was imported: {found[:5]}"
    # (entry points load through importlib, which -X importtime does not list; their imports are)
    assert "standby.core.imagefiles.nbd" in loaded
