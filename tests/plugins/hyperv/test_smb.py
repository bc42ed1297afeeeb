"""VHDX files read over SMB from Samba (the Hyper-V data path), judged by qemu-img."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from doubles.samba import Samba, start_samba

from standby.core.errors import AuthError, NotFound
from standby.plugins.hyperv.smb import TREES, SmbFile
from standby.plugins.hyperv.vhdx import VhdxReader

MiB = 1 << 20


@pytest.fixture(scope="module")
def samba(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Samba]:
    base = tmp_path_factory.mktemp("samba")
    server = start_samba(base / "smb", base / "share")
    try:
        yield server
    finally:
        server.stop()


def test_a_vhdx_reads_over_smb_as_qemu_reads_it(samba: Samba, tmp_path: Path) -> None:
    disk = samba.path / "web01" / "disk0.vhdx"
    disk.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M",
                    str(disk), "12M"], check=True)  # fmt: skip
    subprocess.run(["qemu-io", "-f", "vhdx", "-c", f"write -P 0x3c {5 * MiB} {3 * MiB}",
                    str(disk)], check=True, capture_output=True)  # fmt: skip
    raw = tmp_path / "d.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(disk), str(raw)],
                   check=True)  # fmt: skip
    src = SmbFile("127.0.0.1", samba.share, "web01\\disk0.vhdx", samba.user, samba.password,
                  port=samba.port)  # fmt: skip
    try:
        r = VhdxReader(src, src.where)
        assert list(r.allocated()) == [(5 * MiB, 8 * MiB)]
        assert r.read(0, r.size) == raw.read_bytes()
        whole = raw.read_bytes()
        ranges = [(0, 4096), (5 * MiB - 512, 70000), (6 * MiB, 2 * MiB + 1), (11 * MiB, MiB)]
        batch = r.read_many(ranges)  # in flight together on one connection
        assert batch == [whole[o : o + n] for o, n in ranges]
    finally:
        src.close()


def test_smb_errors_are_one_line(samba: Samba) -> None:
    with pytest.raises(AuthError, match="login failed for user 'root'"):
        SmbFile("127.0.0.1", samba.share, "x.vhdx", "root", "wrong", port=samba.port)
    with pytest.raises(NotFound, match=r"nope\.vhdx not found"):
        SmbFile("127.0.0.1", samba.share, "nope.vhdx", samba.user, samba.password, port=samba.port)


def test_a_closed_file_lends_its_login_to_the_next_and_a_dead_one_is_replaced(
    samba: Samba,
) -> None:
    (samba.path / "t.bin").write_bytes(b"\x5a" * 4096)
    args = ("127.0.0.1", samba.share, "t.bin", samba.user, samba.password)
    TREES.drain()
    first = SmbFile(*args, port=samba.port)
    conn = first.conn
    first.close()
    second = SmbFile(*args, port=samba.port)
    assert second.conn is conn, "the idle tree was not reused"
    assert second.pread(16, 0) == b"\x5a" * 16
    second.close()
    conn.disconnect(True)  # the server dropped it while idle
    third = SmbFile(*args, port=samba.port)
    try:
        assert third.conn is not conn and third.pread(16, 4080) == b"\x5a" * 16
    finally:
        third.close()
    try:
        with pytest.raises(NotFound, match=r"gone\.bin not found"):  # on a lent tree
            SmbFile("127.0.0.1", samba.share, "gone.bin", samba.user, samba.password,
                    port=samba.port)  # fmt: skip
    finally:
        TREES.drain()
