"""Replica chains: one qcow2 overlay per recovery point, on top of the previous point.

A cycle writes into a new overlay backed by the base point's file; committed, the overlay is
never written again. Pruning a point merges its successor down into it (`qemu-img commit`),
so the cost is one cycle's changes, and the successor's ref moves to the merged file.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from standby.core.errors import PluginError
from standby.core.model import DiskSpec, PointInfo


def qemu_img(*args: str) -> None:
    """Run qemu-img; its last line of output as a PluginError when it fails."""
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        line = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]
        raise PluginError(f"qemu-img {args[0]}: {line[0]}")


def virtual_size(path: Path) -> int:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise PluginError(f"qemu-img info {path}: {out.stderr.strip()}")
    return int(json.loads(out.stdout)["virtual-size"])


def ensure_overlay(path: Path, size: int, backing: str | None, backing_format: str) -> None:
    """A new qcow2 (64 KiB clusters) at `path` over `backing`, or grow the one there."""
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        args = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
        if backing:
            args += ["-b", backing, "-F", backing_format]
        qemu_img(*args, str(tmp), str(size))
        tmp.rename(path)
    elif virtual_size(path) < size:
        qemu_img("resize", "-q", "-f", "qcow2", str(path), str(size))


def cycle_overlays(
    disks: Iterable[DiskSpec], base: PointInfo | None, path_of: Callable[[str], Path]
) -> dict[str, Path]:
    """Each disk's overlay for a cycle (`path_of(disk name)`), made over `base`'s file for
    that disk (or grown to the disk's size when it exists: a resumed cycle)."""
    base_files: dict[str, str] = dict(base.ref.get("files", {})) if base else {}
    files: dict[str, Path] = {}
    for disk in disks:
        path = path_of(disk.name)
        ensure_overlay(path, disk.size, base_files.get(disk.name), base_format(base, disk.name))
        files[disk.name] = path
    return files


def base_format(base: PointInfo | None, disk: str) -> str:
    """The format of a point's file for `disk` (seeded points start on raw originals)."""
    return str(base.ref.get("formats", {}).get(disk, "qcow2")) if base else "qcow2"


def prune(
    drop: Iterable[PointInfo],
    keep: Iterable[PointInfo],
    *,
    exists: Callable[[str], bool] | None = None,
    merge_down: Callable[[str, str, str | None, str], None] | None = None,
) -> dict[int, dict[str, Any]]:
    """Merge the dropped points of a chain away; the new refs of kept points that moved.

    Restartable: a merge interrupted after the commit and before the ref moved is found by
    the successor's file being gone (or equal to the dropped one's) and completed.

    For chains of other formats, `exists(file)` and `merge_down(mine, child, grandchild,
    mine's format)` (merge `child` into `mine`, point `grandchild` at `mine`, delete
    `child`) stand in for the local qcow2 ones."""
    exists = exists or (lambda f: Path(f).exists())
    merge_down = merge_down or _merge_qcow2
    drop, keep = list(drop), list(keep)
    points = sorted([*drop, *keep], key=lambda p: p.id)
    dropping = {p.id for p in drop}
    refs: dict[int, dict[str, Any]] = {
        p.id: {**p.ref, "files": dict(p.ref.get("files", {}))} for p in points
    }
    moved: set[int] = set()
    disks = {d for p in points for d in refs[p.id]["files"]}
    for disk in sorted(disks):
        chain = [p.id for p in points if disk in refs[p.id]["files"]]
        for pid in [c for c in chain if c in dropping]:
            idx = chain.index(pid)
            mine = str(refs[pid]["files"][disk])
            if idx + 1 >= len(chain):
                raise PluginError(f"cannot prune point {pid}: it is the newest")
            child_id = chain[idx + 1]
            child = str(refs[child_id]["files"][disk])
            if child == mine:
                pass  # merged already in an interrupted prune
            elif exists(child) and exists(mine):
                grandchild = (
                    str(refs[chain[idx + 2]]["files"][disk]) if idx + 2 < len(chain) else None
                )
                fmt_mine = refs[pid].get("formats", {}).get(disk, "qcow2")
                merge_down(mine, child, grandchild, str(fmt_mine))
            elif not exists(mine):
                raise PluginError(f"replica file {mine} of point {pid} is missing")
            refs[child_id]["files"][disk] = mine
            fmt = refs[pid].get("formats", {}).get(disk)
            if fmt and fmt != "qcow2":
                refs[child_id].setdefault("formats", {})[disk] = fmt
            moved.add(child_id)
            chain.remove(pid)
    return {pid: refs[pid] for pid in moved if pid not in dropping}


def _merge_qcow2(mine: str, child: str, grandchild: str | None, fmt: str) -> None:
    """Commit `child` into `mine`, point the grandchild at `mine`, remove `child`."""
    qemu_img("commit", "-q", "-f", "qcow2", "-d", child)
    if grandchild is not None:
        qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-b", mine, "-F", fmt, grandchild)
    Path(child).unlink()
