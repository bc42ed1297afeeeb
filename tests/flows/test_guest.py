"""End to end with a real tiny Linux guest: files written inside it survive a test failover."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from standby.core.config import Policy
from support.guest import GuestConsole, build_guest, guest_domain_xml
from support.labenv import REPO, Lab, MiB

pytestmark = pytest.mark.slow


def checksums(console: GuestConsole, names: list[str]) -> dict[str, str]:
    out = console.run("md5sum " + " ".join(f"/mnt/{n}" for n in names))
    return {line.split()[1].rsplit("/", 1)[1]: line.split()[0] for line in out.splitlines()}


def test_guest_files_survive_a_test_failover(labenv: Lab) -> None:
    env = labenv
    image = build_guest(REPO / ".cache" / "guest")
    disk = env.base / "disks" / "guest1-vda.qcow2"
    disk.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(64 * MiB)], check=True
    )
    console_path = env.base / "g1.sock"
    dom = env.src.defineXML(guest_domain_xml("guest1", image, disk, console_path))
    env.vms.append("guest1")
    dom.create()
    with GuestConsole(console_path) as guest:
        guest.run("mkfs.ext2 -q /dev/vda || mke2fs /dev/vda")
        guest.run("mount /dev/vda /mnt")
        guest.run("dd if=/dev/urandom of=/mnt/a.bin bs=64k count=16 2>/dev/null")
        guest.run("seq 1 20000 > /mnt/b.txt && mkdir /mnt/d && cp /mnt/a.bin /mnt/d/c.bin")
        guest.run("sync")
        first = checksums(guest, ["a.bin", "b.txt", "d/c.bin"])
        env.engine.protect("guest1", "src", "dr", Policy())
        assert env.engine.replicate("guest1").kind == "full"
        guest.run("dd if=/dev/urandom of=/mnt/e.bin bs=64k count=8 2>/dev/null && sync")
        second = checksums(guest, ["e.bin"])
        inc = env.engine.replicate("guest1")
        assert inc.kind == "incremental" and 0 < inc.bytes_read < 8 * MiB
        guest.run("rm /mnt/b.txt && sync")  # after the point: must not matter
    expected = {**first, **second}
    fo = env.lifecycle.failover("guest1", test=True)
    assert env.src.lookupByName("guest1").isActive()
    with GuestConsole(Path(fo.ref["console"])) as replica:
        replica.run("mount -o ro /dev/vda /mnt")
        got = checksums(replica, ["a.bin", "b.txt", "d/c.bin", "e.bin"])
    assert got == expected
    env.lifecycle.cleanup("guest1")
    assert "guest1-test" not in {d.name() for d in env.dr.listAllDomains()}
