"""The qcow2 allocation reader against qemu-img's own map of the same overlay."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from standby.core.errors import PluginError
from standby.core.extents import normalize
from standby.core.imagefiles import qcow2

MiB = 1 << 20


def qemu_img_top(path: Path) -> list[tuple[int, int]]:
    """What `qemu-img map` says this file itself holds (depth 0: data or zeroes)."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", str(path)], check=True, capture_output=True
    ).stdout
    return normalize(
        (e["start"], e["start"] + e["length"])
        for e in json.loads(out)
        if e["depth"] == 0 and (e["data"] or e["zero"]) and e.get("present", True)
    )


def test_allocated_matches_qemu_img_map_for_an_overlay(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    io = ["qemu-io", "-c"]
    subprocess.run([*io, "write -P 0x11 0 8M", str(base)], check=True, capture_output=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", str(base),
         "-F", "qcow2", str(top), "80M"], check=True,
    )  # fmt: skip
    cmds = ["write -P 0x22 1M 64k", "write -P 0x33 10M 192k", "write -z 2M 128k",
            "write -P 0x44 79M 1M"]  # fmt: skip
    for c in cmds:
        subprocess.run([*io, c, str(top)], check=True, capture_output=True)
    found = qcow2.allocated(top)
    assert found == [
        (1 * MiB, 1 * MiB + 65536),
        (2 * MiB, 2 * MiB + 131072),
        (10 * MiB, 10 * MiB + 196608),
        (79 * MiB, 80 * MiB),
    ]
    assert found == qemu_img_top(top)
    assert qcow2.allocated(base) == [(0, 8 * MiB)]


def test_not_a_qcow2_is_a_plugin_error(tmp_path: Path) -> None:
    raw = tmp_path / "x.raw"
    raw.write_bytes(bytes(4096))
    with pytest.raises(PluginError, match="not a qcow2"):
        qcow2.allocated(raw)
