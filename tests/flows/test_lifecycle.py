"""The failover lifecycle on real libvirt: test, planned (zero loss), commit, re-protect,
failback and back again; unplanned with its data-loss window."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from standby.core.config import Policy
from standby.core.errors import ConfigError
from standby.plugins.physical import lab
from support.labenv import Lab, MiB, write_site

POLICY = Policy(shutdown_timeout_seconds=1)  # lab VMs have no OS to answer ACPI shutdown


@pytest.fixture(scope="module")
def env(labenv: Lab) -> Lab:
    # the source host is also where failback lands: it needs a replica directory
    write_site(
        labenv.home,
        "src",
        f'plugin = "physical"\nuri = "{labenv.src_uri}"\npool_dir = "{labenv.base}/srcpool"\n'
        'domain_type = "qemu"\n',
    )
    labenv.release()
    return labenv


def domain_disk(conn: object, name: str, dev: str) -> Path:
    from standby.plugins.physical.domxml import disk_sources

    dom = conn.lookupByName(name)  # type: ignore[attr-defined]
    return Path(disk_sources(dom.XMLDesc(0))[dev]["file"])


def test_planned_failover_commit_reprotect_failback(env: Lab) -> None:
    e = env.engine
    life = env.lifecycle
    env.create_vm("lc1", [("vda", 32 * MiB, "qcow2"), ("vdb", 16 * MiB, "qcow2")])
    env.write("lc1", "vda", 0, 2 * MiB, 0x11)
    env.write("lc1", "vdb", MiB, MiB, 0x22)
    e.protect("lc1", "src", "dr", POLICY)
    e.replicate("lc1")

    # a drill first: the source is untouched, and cleanup leaves nothing
    life.failover("lc1", kind="test")
    life.cleanup("lc1")

    # written just before the planned failover: must be in the failed-over disks
    env.write("lc1", "vda", 5 * MiB, 65536, 0x77)
    fo = life.failover("lc1", kind="planned")
    assert fo.kind == "planned" and fo.data_loss_seconds == 0
    assert env.src.lookupByName("lc1").isActive() == 0, "the source VM was shut down"
    assert env.dr.lookupByName("lc1").isActive() == 1
    dr_vda = domain_disk(env.dr, "lc1", "vda")
    assert lab.has_pattern(dr_vda, 5 * MiB, 65536, 0x77)
    assert lab.has_pattern(dr_vda, 0, 2 * MiB, 0x11)

    with pytest.raises(ConfigError, match="already failed over"):
        life.failover("lc1", kind="unplanned")
    with pytest.raises(ConfigError, match="replication is stopped"):
        e.replicate("lc1")
    with pytest.raises(ConfigError, match="commit the failover"):
        life.reprotect("lc1")
    with pytest.raises(ConfigError, match="not re-protected"):
        life.failback("lc1")

    life.commit("lc1")
    life.reprotect("lc1")
    with pytest.raises(ConfigError, match="not caught up"):
        life.failback("lc1")

    # the VM works at the DR site; re-protect ships only what differs from the original disks
    lab.guest_write(env.dr, "lc1", "vda", 9 * MiB, 65536, 0x99)
    lab.guest_write(env.dr, "lc1", "vdb", 0, 65536, 0x98)
    first = e.replicate("lc1")
    assert first.kind == "hashcompare"
    assert first.bytes_written == 2 * 65536, "only the blocks written at the DR site travel back"

    fb = life.failback("lc1")
    assert fb.kind == "planned" and fb.vm_name == "lc1"
    assert env.dr.lookupByName("lc1").isActive() == 0
    home_dom = env.src.lookupByName("lc1")
    assert home_dom.isActive() == 1
    home_vda = domain_disk(env.src, "lc1", "vda")
    assert lab.has_pattern(home_vda, 9 * MiB, 65536, 0x99), "the DR-site write came home"
    assert lab.has_pattern(home_vda, 5 * MiB, 65536, 0x77)
    assert lab.has_pattern(domain_disk(env.src, "lc1", "vdb"), 0, 65536, 0x98)

    # and protected in the original direction again
    life.commit("lc1")
    life.reprotect("lc1")
    env.write("lc1", "vda", 12 * MiB, 65536, 0x55)
    again = e.replicate("lc1")
    assert again.bytes_written == 65536
    with e.state.session() as s:
        prot = e.state.protection(s, "lc1")
        assert (prot.source_site, prot.target_site, prot.generation) == ("src", "dr", 3)


def test_unplanned_failover_reports_the_loss_window(env: Lab) -> None:
    e = env.engine
    life = env.lifecycle
    env.create_vm("lc2", [("vda", 16 * MiB, "qcow2")])
    env.write("lc2", "vda", 0, MiB, 0x31)
    e.protect("lc2", "src", "dr", POLICY)
    point = e.replicate("lc2")
    env.write("lc2", "vda", 2 * MiB, 65536, 0x32)  # after the point: lost in an unplanned one
    with e.state.session() as s:
        prot = e.state.protection(s, "lc2")
        taken = next(p.created_at for p in prot.points if p.id == point.point_id)
    taken = taken if taken.tzinfo else taken.replace(tzinfo=UTC)
    before = datetime.now(UTC)
    fo = life.failover("lc2", kind="unplanned")
    after = datetime.now(UTC)
    assert fo.data_loss_seconds is not None
    assert (before - taken).total_seconds() - 1 <= fo.data_loss_seconds
    assert fo.data_loss_seconds <= (after - taken).total_seconds() + 1
    assert env.src.lookupByName("lc2").isActive() == 1, "unplanned does not touch the source"
    dr_vda = domain_disk(env.dr, "lc2", "vda")
    assert lab.has_pattern(dr_vda, 0, MiB, 0x31)
    assert lab.has_pattern(dr_vda, 2 * MiB, 65536, 0x00)

    # re-protect after an unplanned failover: the original must be off; then only real
    # differences travel (the blocks are compared against the original disks)
    life.commit("lc2")
    with pytest.raises(ConfigError, match="running"):
        life.reprotect("lc2")
    env.src.lookupByName("lc2").destroy()
    life.reprotect("lc2")
    first = e.replicate("lc2")
    # the original holds one block the failed-over VM never had (0x32): it is zeroed back
    assert first.bytes_written + first.bytes_zeroed == 65536
