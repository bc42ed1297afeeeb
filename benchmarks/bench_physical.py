"""Benchmark of the physical (libvirt) plugin: initial sync and one incremental cycle.

One run builds a deterministic, half-allocated qcow2 disk, protects a VM using it between two
embedded libvirt roots, and times `standby replicate` against peers on the same content:
`qemu-img convert` for the initial sync, `restic backup` and `rsync --no-whole-file` for the
incremental after 1% of the 64 KiB blocks change. See benchmarks/README.md for the method.

    uv run python benchmarks/bench_physical.py [--size-gib 4] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from standby.plugins.physical import lab

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
BLOCK = 64 * KIB
SEED = 20240611
VM = "bench01"
KINDS = {"hole": 50, "zero": 10, "text": 20, "random": 20}
"""Share (by expected bytes) of each kind of region in the source disk."""
SPANS = (256 * KIB, MIB, 4 * MIB, 16 * MIB)
WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "elit", "sed", "do", "tempor", "magna")


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Run a command, fail loudly, return its stdout."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall-clock seconds of one command (after flushing dirty pages) and its stdout."""
    os.sync()
    start = time.monotonic()
    out = run(cmd, env)
    return time.monotonic() - start, out


def text_block(length: int, first: int) -> bytes:
    """Log-like text (timestamps, counters, lorem words), never repeating thanks to counters."""
    lines = [
        f"2024-06-11T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}.{i % 997:03d}Z "
        f"INFO app-{i % 7}[{4000 + i % 13}] req={i} {WORDS[i % 10]} {WORDS[i * 7 % 10]} "
        f"path=/api/items/{i * 7919 % 100003} status=200 ms={i % 251}\n"
        for i in range(first, first + length // 80 + 1)
    ]
    return "".join(lines).encode()[:length]


def plan_regions(size: int, rng: random.Random) -> list[tuple[str, int, int]]:
    """(kind, offset, length) regions covering the disk; region 0 is text (never bootable)."""
    regions, offset = [], 0
    while offset < size:
        length = min(rng.choice(SPANS), size - offset)
        kind = "text" if offset == 0 else rng.choices(list(KINDS), list(KINDS.values()))[0]
        regions.append((kind, offset, length))
        offset += length
    return regions


def build_disk(raw: Path, qcow2: Path, size: int) -> dict[str, Any]:
    """A sparse raw master and the qcow2 source disk with the same guest-visible content.

    Zero regions are holes in the raw file but allocated (written) zero clusters in the qcow2,
    like a guest's freshly zeroed files; holes stay unallocated in both."""
    rng = random.Random(SEED)
    regions = plan_regions(size, rng)
    counts = dict.fromkeys(KINDS, 0)
    with raw.open("wb") as f:
        f.truncate(size)
        for kind, offset, length in regions:
            counts[kind] += length
            if kind in ("text", "random"):
                data = text_block(length, offset // 64) if kind == "text" else rng.randbytes(length)
                os.pwrite(f.fileno(), data, offset)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])
    zeros = [f"write -P 0 {o} {n}" for k, o, n in regions if k == "zero"]
    for i in range(0, len(zeros), 200):
        cmds = [arg for c in zeros[i : i + 200] for arg in ("-c", c)]
        run(["qemu-io", "-f", "qcow2", *cmds, str(qcow2)])
    extents = json.loads(run(["qemu-img", "map", "--output=json", str(qcow2)]))
    allocated = sum(e["length"] for e in extents if e["data"])
    facts = {"size": size, "regions": len(regions), "allocated_bytes": allocated}
    return facts | {f"{k}_bytes": v for k, v in counts.items()}


def pick_changes(size: int, seed: int = SEED + 1) -> list[tuple[int, int]]:
    """1% of the 64 KiB blocks, chosen at random (fixed seed), each with a fill byte."""
    rng = random.Random(seed)
    blocks = rng.sample(range(size // BLOCK), max(1, size // BLOCK // 100))
    return [(b * BLOCK, 1 + b % 255) for b in sorted(blocks)]


def change_raw(raw: Path, changes: list[tuple[int, int]]) -> None:
    """Apply the guest's block changes to the raw master the peers work on."""
    with raw.open("r+b") as f:
        for offset, fill in changes:
            os.pwrite(f.fileno(), bytes([fill]) * BLOCK, offset)


class Standby:
    """The standby CLI with its own STANDBY_HOME and two embedded libvirt roots."""

    def __init__(self, work: Path, vm: str = VM) -> None:
        self.vm = vm
        self.qmp = work / "q.sock"
        self.device = ""
        self.service: subprocess.Popen[str] | None = None
        self.src_uri = f"qemu:///embed?root={work / 'src-host'}"
        self.dr_uri = f"qemu:///embed?root={work / 'dr-host'}"
        self.pool = work / "dr-pool"
        self.env = os.environ | {"STANDBY_HOME": str(work / "home")}
        exe = Path(sys.executable).with_name("standby")
        self.exe = str(exe) if exe.exists() else shutil.which("standby") or "standby"

    def __call__(self, *args: str) -> str:
        return run([self.exe, *args], self.env)

    def setup(self, disk: Path) -> None:
        """Start the source VM on the prepared disk, add both sites, protect the VM."""
        conn = lab.connect(self.src_uri)
        try:
            size = disk.stat().st_size
            lab.create_vm(conn, VM, disk.parent, [("vda", size, "qcow2")], qmp_socket=self.qmp)
            self.device = lab.qdev_path(conn.lookupByName(VM), "vda")
        finally:
            conn.close()  # the CLI opens this embedded root next: one process at a time
        dr = ["--set", f'pool_dir="{self.pool}"', "--set", 'domain_type="qemu"']
        self("sites", "add", "src", "--plugin", "physical", "--set", f'uri="{self.src_uri}"')
        self("sites", "add", "dr", "--plugin", "physical", "--set", f'uri="{self.dr_uri}"', *dr)
        self("protect", VM, "--from", "src", "--to", "dr", "--rpo", "1h", "--retain", "3")

    def replicate(self) -> dict[str, Any]:
        """One timed `standby replicate VM --json`: its report plus the command's wall time."""
        wall, out = timed([self.exe, "replicate", self.vm, "--json"], self.env)
        report: dict[str, Any] = json.loads(out)[0]
        return report | {"wall_seconds": wall}

    def guest_writes(self, changes: list[tuple[int, int]]) -> float:
        """Write the changed blocks inside the running VM (qemu-io through the VM's own QMP
        monitor, so it works while a standby process holds the root); returns the seconds."""
        start = time.monotonic()
        w = lab.QmpWriter(self.qmp)
        try:
            for offset, fill in changes:
                w.qemu_io(self.device, f"write -q -P {fill:#x} {offset} {BLOCK}")
                w.io_done()
        finally:
            w.close()
        return time.monotonic() - start

    def serve(self) -> None:
        """Start the service (`standby replicate --watch`); return once it listens."""
        self.service = subprocess.Popen(
            [self.exe, "replicate", "--watch", "--interval", "5"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        sock = Path(self.env["STANDBY_HOME"]) / "run" / "standby.sock"
        deadline = time.monotonic() + 60
        while not sock.exists():
            if time.monotonic() > deadline or self.service.poll() is not None:
                raise RuntimeError("the standby service did not start")
            time.sleep(0.05)

    def stop_service(self) -> None:
        if self.service is not None:
            self.service.send_signal(signal.SIGINT)
            self.service.communicate(timeout=120)
            self.service = None

    def replica(self) -> Path:
        """The newest replica overlay (top of the chain of the latest point)."""
        return max(self.pool.glob("*/vda.c*.qcow2"))

    def destroy(self) -> None:
        """Destroy the source VM and any replica appliance left in the DR root."""
        self.stop_service()
        for uri, prefix in ((self.src_uri, self.vm), (self.dr_uri, "standby-replica-")):
            conn = lab.connect(uri)
            try:
                for dom in conn.listAllDomains():
                    if dom.name().startswith(prefix):
                        lab.destroy_vm(conn, dom.name())
            finally:
                conn.close()


def qemu_img_convert(src: Path, dst: Path, rounds: int = 3) -> dict[str, dict[str, Any]]:
    """Seconds of `qemu-img convert -O qcow2` of the (in-use) source disk to a new file, with
    its defaults and with -W (out-of-order writes), interleaved; the median of `rounds` runs."""
    runs: dict[str, list[float]] = {"qemu_img_convert": [], "qemu_img_convert_W": []}
    for _ in range(rounds):
        for key, extra in zip(runs, ([], ["-W"]), strict=True):
            cmd = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", *extra]
            runs[key].append(timed([*cmd, str(src), str(dst)])[0])
            dst.unlink()
    return {k: {"seconds": statistics.median(v), "runs": v} for k, v in runs.items()}


def nbdcopy_reference(src: Path, work: Path, size: int) -> dict[str, Any]:
    """`nbdcopy` from a qemu-nbd export of the raw master (same bytes as the source disk, which
    the running VM locks) into a qemu-nbd export of a new qcow2: the same architecture as
    standby (NBD export at the source, NBD writes into a qcow2 at the target), without
    standby. Sparse-aware like standby (holes and zeroes skipped)."""
    dst, a, b = work / "nbdcopy.qcow2", work / "nbd-src.sock", work / "nbd-dst.sock"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(dst), str(size)])
    servers = [
        subprocess.Popen(["qemu-nbd", "-r", "-e", "8", "-f", "raw", "-k", str(a), str(src)]),
        subprocess.Popen(["qemu-nbd", "-e", "8", "-f", "qcow2", "-k", str(b), str(dst)]),
    ]
    try:
        deadline = time.monotonic() + 30
        while not (a.exists() and b.exists()):
            if time.monotonic() > deadline or any(p.poll() is not None for p in servers):
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.05)
        # --flush: the copy ends durable on disk, as a standby recovery point does
        cmd = ["nbdcopy", "--flush", f"nbd+unix:///?socket={a}", f"nbd+unix:///?socket={b}"]
        seconds, _ = timed(cmd)
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait()
    equal = lab.images_equal(src, dst, "raw", "qcow2")
    dst.unlink()
    return {"seconds": seconds, "equal": equal}


ROUNDS = 3
"""Initial syncs of standby and nbdcopy runs, taking turns (their times move by +-50%)."""


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median `key`, with every run's `key` kept beside it."""
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[len(ordered) // 2] | {f"all_{key}": [round(r[key], 3) for r in runs]}


def dir_bytes(path: Path) -> int:
    """Total size of the files under a directory."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def restic_backup(env: dict[str, str], repo: Path, path: Path) -> dict[str, Any]:
    """One timed `restic backup`: seconds, restic's summary and the repository's growth."""
    before = dir_bytes(repo)
    seconds, out = timed(["restic", "backup", "--json", str(path)], env)
    summary = [m for m in map(json.loads, out.splitlines()) if m["message_type"] == "summary"]
    return {
        "seconds": seconds,
        "data_added": summary[0]["data_added"],
        "bytes_processed": summary[0]["total_bytes_processed"],
        "repo_growth": dir_bytes(repo) - before,
    }


def borg_create(
    env: dict[str, str], repo: Path, path: Path, name: str, *extra: str
) -> dict[str, Any]:
    """One timed `borg create --chunker-params fixed,65536` of the raw master."""
    before = dir_bytes(repo)
    cmd = ["borg", "create", "--json", "--chunker-params", "fixed,65536", *extra]
    seconds, out = timed([*cmd, f"{repo}::{name}", str(path)], env)
    stats = json.loads(out)["archive"]["stats"]
    return {
        "seconds": seconds,
        "deduplicated_size": stats["deduplicated_size"],
        "original_size": stats["original_size"],
        "repo_growth": dir_bytes(repo) - before,
        "options": list(extra),
    }


def borg_env(work: Path) -> dict[str, str]:
    """An unencrypted repository (standby's physical replicas are not encrypted either, so
    this is borg at its fastest) with its own cache and config under the work directory."""
    return os.environ | {
        "BORG_BASE_DIR": str(work / "borg-base"),
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
    }


def rsync_delta(src: Path, dst: Path) -> dict[str, Any]:
    """Timed `rsync --inplace --no-whole-file --stats` of one local file onto its old copy."""
    seconds, out = timed(["rsync", "--inplace", "--no-whole-file", "--stats", str(src), str(dst)])

    def stat(label: str) -> int:
        m = re.search(rf"^{label}: ([\d,]+)", out, re.M)
        return int(m.group(1).replace(",", "")) if m else -1

    names = {"bytes_sent": "Total bytes sent", "literal_data": "Literal data"}
    return {"seconds": seconds} | {k: stat(label) for k, label in names.items()}


def machine(work: Path) -> dict[str, Any]:
    """Facts about this machine and the tools' versions."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")

    def first(cmd: list[str]) -> str:
        return run(cmd).splitlines()[0].strip()

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB, 1),
        "loadavg": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu_img": first(["qemu-img", "--version"]),
        "restic": first(["restic", "version"]),
        "borg": first(["borg", "--version"]),
        "rsync": first(["rsync", "--version"]),
        "libvirt": first(["virsh", "--version"]),
        "workdir_fs": first(["stat", "-f", "-c", "%T", str(work)]),
    }


def mibs(nbytes: int, seconds: float) -> float:
    """MiB per second, one decimal."""
    return round(nbytes / MIB / seconds, 1) if seconds else 0.0


def bench(work: Path, size: int, console: Console) -> dict[str, Any]:
    """The whole benchmark; returns every figure."""
    sb, raw, copy = Standby(work), work / "master.raw", work / "rsync-dest.raw"
    disk, repo = work / "src-disks" / f"{VM}-vda.qcow2", work / "restic"
    disk.parent.mkdir(parents=True)
    console.log(f"building the {size / GIB:g} GiB source disk")
    t0 = time.monotonic()
    content = build_disk(raw, disk, size)
    alloc, content["build_seconds"] = content["allocated_bytes"], time.monotonic() - t0
    run(["cp", "--sparse=always", str(raw), str(copy)])
    renv = os.environ | {"RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": str(repo)}
    renv["RESTIC_CACHE_DIR"] = str(work / "restic-cache")
    try:
        sb.setup(disk)
        console.log("initial sync: standby, qemu-img convert (default, -W), restic backup")
        fulls, ncs = [], []
        for i in range(ROUNDS):  # standby and nbdcopy take turns; the medians count
            if i:
                sb("unprotect", VM, "--yes")
                sb("protect", VM, "--from", "src", "--to", "dr", "--rpo", "1h", "--retain", "3")
            fulls.append(sb.replicate())
            ncs.append(nbdcopy_reference(raw, work, size))
        full = median_run(fulls, "seconds")
        nc = median_run(ncs, "seconds")
        qi = qemu_img_convert(disk, work / "copy.qcow2")
        run(["restic", "init"], renv)
        restic_first = restic_backup(renv, repo, raw)
        benv, brepo = borg_env(work), work / "borg"
        run(["borg", "init", "--encryption=none", str(brepo)], benv)
        borg_first = borg_create(benv, brepo, raw, "first")
        changes = pick_changes(size)
        console.log(f"changing {len(changes)} blocks of 64 KiB in the guest and the raw master")
        write_seconds = sb.guest_writes(changes)
        change_raw(raw, changes)
        console.log("incremental: standby, restic (second backup), rsync")
        inc = sb.replicate()
        console.log(f"incremental, served by the running service: {ROUNDS} changes of that size")
        sb.serve()
        later = [(0, 0x42)]  # the service's first cycle opens its connections
        sb.guest_writes(later)
        served_first = sb.replicate()
        serveds = []
        for i in range(ROUNDS):
            changes = pick_changes(size, seed=SEED + 2 + i)
            sb.guest_writes(changes)
            later += changes
            serveds.append(sb.replicate())
        served = median_run(serveds, "wall_seconds")
        sb.stop_service()
        console.log("incremental peers on the raw master (the first change only)")
        restic_second = restic_backup(renv, repo, raw)
        borg_second = borg_create(benv, brepo, raw, "second")
        borg_sparse = borg_create(benv, brepo, raw, "third", "--sparse")
        rs = rsync_delta(raw, copy)
        rsync_equal = lab.images_equal(raw, copy, "raw", "raw")
        change_raw(raw, later)  # now the raw master has every change the guest had
        console.log("checking the replica and the peers' files against the source disk")
        equal = {
            "replica": lab.images_equal(disk, sb.replica()),
            "raw_master": lab.images_equal(disk, raw, "qcow2", "raw"),
            "rsync_copy_after_the_first_change": rsync_equal,
        }
    finally:
        sb.destroy()
    changed, qi_s = len(changes) * BLOCK, qi["qemu_img_convert"]["seconds"]
    full |= {"mib_s_wall": mibs(alloc, full["wall_seconds"])}
    full |= {"mib_s_report": mibs(alloc, full["seconds"])}
    return {
        "machine": machine(work),
        "disk": content,
        "equal_to_source": equal,
        "initial": {
            "standby": full,
            **{k: v | {"mib_s": mibs(alloc, v["seconds"])} for k, v in qi.items()},
            "restic_first_backup": restic_first,
            "borg_first_create": borg_first,
            "nbdcopy_nbd_to_nbd": nc | {"mib_s": mibs(alloc, nc["seconds"])},
            "speed_ratio_vs_nbdcopy_report": round(nc["seconds"] / full["seconds"], 3),
            "speed_ratio_vs_nbdcopy_wall": round(
                nc["seconds"] / median_run(fulls, "wall_seconds")["wall_seconds"], 3
            ),
            "speed_ratio_wall": round(qi_s / full["wall_seconds"], 3),
            "speed_ratio_report": round(qi_s / full["seconds"], 3),
        },
        "incremental": {
            "changed_blocks": len(changes),
            "bytes_changed": changed,
            "guest_write_seconds": write_seconds,
            "standby": inc,
            "shipped_over_changed": round(inc["bytes_written"] / changed, 3),
            "restic_second_backup": restic_second,
            "borg_second_create": borg_second,
            "borg_sparse_create": borg_sparse,
            "rsync": rs,
            "restic_over_standby_wall": round(restic_second["seconds"] / inc["wall_seconds"], 2),
            "rsync_over_standby_wall": round(rs["seconds"] / inc["wall_seconds"], 2),
            "borg_over_standby_wall": round(borg_second["seconds"] / inc["wall_seconds"], 2),
            "standby_served": served,
            "standby_served_first_cycle": served_first,
            "served_shipped_over_changed": round(served["bytes_written"] / changed, 3),
            "restic_over_served_wall": round(restic_second["seconds"] / served["wall_seconds"], 2),
            "borg_over_served_wall": round(borg_second["seconds"] / served["wall_seconds"], 2),
            "borg_sparse_over_standby_wall": round(borg_sparse["seconds"] / inc["wall_seconds"], 2),
        },
    }


def mib(n: int) -> str:
    """Bytes as MiB for the table."""
    return f"{n / MIB:,.1f}"


def show(r: dict[str, Any], console: Console) -> None:
    """The results table and the verdict on each target."""
    ini, inc, alloc = r["initial"], r["incremental"], r["disk"]["allocated_bytes"]
    s, n, v = ini["standby"], inc["standby"], inc["standby_served"]
    qi, qw = ini["qemu_img_convert"], ini["qemu_img_convert_W"]
    r1, r2, ry = ini["restic_first_backup"], inc["restic_second_backup"], inc["rsync"]
    nc, b1 = ini["nbdcopy_nbd_to_nbd"], ini["borg_first_create"]
    b2, b3 = inc["borg_second_create"], inc["borg_sparse_create"]
    title = (
        f"{r['disk']['size'] / GIB:g} GiB disk, {mib(alloc)} MiB allocated, "
        f"{inc['changed_blocks']} blocks changed, {r['machine']['nproc']} cores"
    )
    t = Table(
        "phase", "tool", "seconds", "MiB/s (allocated)", "MiB read", "MiB shipped", title=title
    )
    # fmt: off
    rows = [
        ("initial", "standby replicate (wall)", s["wall_seconds"], s["mib_s_wall"],
         mib(s["bytes_read"]), mib(s["bytes_written"])),
        ("", f"standby (report seconds), median of {ROUNDS}", s["seconds"], s["mib_s_report"],
         "", ""),
        ("", "qemu-img convert (median of 3)", qi["seconds"], qi["mib_s"], "", ""),
        ("", "qemu-img convert -W (median of 3)", qw["seconds"], qw["mib_s"], "", ""),
        ("", f"nbdcopy NBD -> NBD, median of {ROUNDS}", nc["seconds"], nc["mib_s"], "", ""),
        ("", "restic backup (first)", r1["seconds"], "", mib(r1["bytes_processed"]),
         f"{mib(r1['data_added'])} (repo +{mib(r1['repo_growth'])})"),
        ("", "borg create fixed,65536 (first)", b1["seconds"], "", "",
         f"{mib(b1['deduplicated_size'])} dedup (repo +{mib(b1['repo_growth'])})"),
        ("incremental", "standby replicate (wall)", n["wall_seconds"], "", mib(n["bytes_read"]),
         mib(n["bytes_written"])),
        ("", "standby (report seconds)", n["seconds"], "", "", ""),
        ("", "standby replicate, served (wall)", v["wall_seconds"], "", mib(v["bytes_read"]),
         mib(v["bytes_written"])),
        ("", "standby, served (report seconds)", v["seconds"], "", "", ""),
        ("", "restic backup (second)", r2["seconds"], "", mib(r2["bytes_processed"]),
         f"{mib(r2['data_added'])} (repo +{mib(r2['repo_growth'])})"),
        ("", "borg create fixed,65536 (second)", b2["seconds"], "", "",
         f"{mib(b2['deduplicated_size'])} dedup (repo +{mib(b2['repo_growth'])})"),
        ("", "borg create ... --sparse (third)", b3["seconds"], "", "",
         f"{mib(b3['deduplicated_size'])} dedup"),
        ("", "rsync --no-whole-file", ry["seconds"], "", "",
         f"{mib(ry['bytes_sent'])} (literal {mib(ry['literal_data'])})"),
    ]
    # fmt: on
    for phase, tool, secs, rate, read, shipped in rows:
        t.add_row(phase, tool, f"{secs:.2f}", str(rate), read, shipped)
    console.print(t)
    console.print(
        f"initial: standby at {ini['speed_ratio_vs_nbdcopy_report']}x nbdcopy's speed by the "
        f"cycle ({ini['speed_ratio_vs_nbdcopy_wall']}x by wall; target >= 0.8x), "
        f"{ini['speed_ratio_report']}x qemu-img convert's (wall {ini['speed_ratio_wall']}x)\n"
        f"incremental: {mib(inc['bytes_changed'])} MiB changed, standby shipped "
        f"{inc['shipped_over_changed']}x that (target <= 1.2x); by whole-command wall time "
        f"restic took {inc['restic_over_standby_wall']}x (target >= 10x), borg "
        f"{inc['borg_over_standby_wall']}x (target >= 6x; with --sparse "
        f"{inc['borg_sparse_over_standby_wall']}x), rsync {inc['rsync_over_standby_wall']}x\n"
        f"served by the running service: restic took {inc['restic_over_served_wall']}x and "
        f"borg {inc['borg_over_served_wall']}x standby's wall time\n"
        f"equal to the source disk: {r['equal_to_source']}"
    )


def clean(work: Path) -> None:
    """Remove everything the run made except results.json."""
    for p in work.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name != "results.json":
            p.unlink()


def run_and_report(
    work: Path,
    keep: bool,
    width: int,
    run: Callable[[Console], dict[str, Any]],
    show: Callable[[dict[str, Any], Console], None],
) -> int:
    """The frame every benchmark shares: refuse a work directory that holds an earlier run,
    run, write and print results.json, show the table, and clean up unless `keep`."""
    if work.exists() and any(p.name != "results.json" for p in work.iterdir()):
        raise SystemExit(f"{work} holds an earlier run; remove it (and any VMs in it) first")
    work.mkdir(parents=True, exist_ok=True)
    console = Console(width=max(width, shutil.get_terminal_size().columns))
    try:
        results = run(console)
        text = json.dumps(results, indent=2)
        (work / "results.json").write_text(text + "\n")
        print(text)
        show(results, console)
    finally:
        if not keep:
            clean(work)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the benchmark, write results.json, print the figures."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--size-gib", type=float, default=4.0, help="source disk size (GiB)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/standby-bench"))
    p.add_argument("--keep", action="store_true", help="keep disks, roots and repositories")
    args = p.parse_args(argv)
    size = int(args.size_gib * GIB) // MIB * MIB
    work: Path = args.workdir.resolve()
    return run_and_report(work, args.keep, 120, lambda c: bench(work, size, c), show)


if __name__ == "__main__":
    sys.exit(main())
