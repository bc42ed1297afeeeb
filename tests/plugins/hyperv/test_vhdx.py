"""The VHDX reader judged by QEMU: bytes and allocation of files qemu-img wrote."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from standby.core.errors import PluginError
from standby.plugins.hyperv.vhdx import LocalFile, VhdxReader

MiB = 1 << 20


def qemu(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_bytes_and_allocation_match_qemu(tmp_path: Path, subformat: str) -> None:
    disk = tmp_path / "d.vhdx"
    qemu("qemu-img", "create", "-q", "-f", "vhdx", "-o", f"subformat={subformat},block_size=1M",
         str(disk), "24M")  # fmt: skip
    rng = random.Random(7)
    for off, n in ((0, 4096), (3 * MiB + 512, 70000), (17 * MiB, 2 * MiB)):
        pattern = rng.randrange(1, 255)
        qemu("qemu-io", "-f", "vhdx", "-c", f"write -P {pattern} {off} {n}", str(disk))
    raw = tmp_path / "d.raw"
    qemu("qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(disk), str(raw))
    src = LocalFile(disk)
    try:
        r = VhdxReader(src, str(disk))
        assert r.size == 24 * MiB
        want = raw.read_bytes()
        got = b"".join(r.read(o, min(5 * MiB, r.size - o)) for o in range(0, r.size, 5 * MiB))
        assert got == want
        assert r.read(3 * MiB + 100, 1000) == want[3 * MiB + 100 : 3 * MiB + 1100]
        spans = list(r.allocated())
        # the 1 MiB blocks written, for both subformats: QEMU marks a fixed VHDX's unwritten
        # blocks ZERO in its BAT (qemu-img map reports a VHDX as all data: no judge there)
        assert spans == [(0, MiB), (3 * MiB, 4 * MiB), (17 * MiB, 19 * MiB)]
    finally:
        src.close()


def test_not_a_vhdx_is_refused_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "x.vhdx"
    bad.write_bytes(b"\0" * 4096)
    src = LocalFile(bad)
    try:
        with pytest.raises(PluginError, match=r"x\.vhdx is not a VHDX file"):
            VhdxReader(src, str(bad))
    finally:
        src.close()
