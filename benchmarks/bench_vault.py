"""Benchmark of the recovery vault: the chunk pipeline alone, then KVM -> vault backups against
restic and borg on the same content.

One run builds bench_physical's deterministic, half-allocated disk (the qcow2 of a running VM
in an embedded libvirt root, and the same bytes in the sparse `master.raw`), then measures:

1. the chunk pipeline alone: `master.raw` (page-cached) read in 4 MiB pieces (holes skipped
   with SEEK_DATA/SEEK_HOLE, all-zero pieces skipped) into a `VaultWriter` of a local
   directory vault, 2 threads, until the point is committed (3 rounds, a new vault each),
   and beside each round its two floors: the CPU work alone (name, compress, seal) and the
   fsynced 16 MiB pack writes alone;
2. the first backup: `standby replicate VM` into a vault site, against `restic backup`
   (`--compression auto`) and `borg create --compression zstd,3` (repokey) of `master.raw`;
3. the second backup after 655 random 64 KiB guest writes (1%), the same bytes written into
   `master.raw` (its mtime moves: restic and borg read it again);
4. stored bytes after each backup: the vault's `stored_bytes` against the repositories' sizes;
5. for information, the same 1% change served by the running service (`replicate --watch`).

See benchmarks/README.md for the method and the latest figures.

    uv run python benchmarks/bench_vault.py [--size-gib 4] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks")]
import bench_physical as bp  # noqa: E402

from standby.core.config import get_site  # noqa: E402
from standby.core.extents import split  # noqa: E402
from standby.core.model import DiskSpec, ProtectionInfo, VMSpec  # noqa: E402
from standby.core.vault.store import LocalStore  # noqa: E402
from standby.core.vault.target import VaultTarget, VaultWriter  # noqa: E402
from standby.core.vault.vault import PACK_BYTES  # noqa: E402
from standby.plugins.physical import lab  # noqa: E402

MIB, GIB = bp.MIB, bp.GIB
GB = 10**9
PIECE = 4 * MIB
THREADS = 2
ROUNDS = 3
"""Rounds of the chunk pipeline (a new vault each); the median counts."""
PASS_ENV, PASSPHRASE = "SB_BENCH_VAULT_PASS", "bench vault passphrase"
TARGETS = {"pipeline_gb_s": 1.0, "first_x": 2.0, "second_x": 10.0, "stored_x": 1.1}


def data_pieces(raw: Path, size: int) -> list[tuple[int, int]]:
    """The file's data extents (SEEK_DATA/SEEK_HOLE), cut into pieces of at most 4 MiB on
    4 MiB boundaries (as the engine cuts its units)."""
    extents, off = [], 0
    fd = os.open(raw, os.O_RDONLY)
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after off
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, end))
            off = end
    finally:
        os.close(fd)
    return split(extents, PIECE)


def read_all(raw: Path, pieces: list[tuple[int, int]]) -> int:
    """Read every piece once (into the page cache); returns the bytes read."""
    fd = os.open(raw, os.O_RDONLY)
    try:
        return sum(len(os.pread(fd, e - s, s)) for s, e in pieces)
    finally:
        os.close(fd)


def pipeline_vault(sb: bp.Standby, work: Path, name: str) -> VaultTarget:
    """A new local directory vault `name` and its site (both named `name`)."""
    store = work / f"{name}-store"
    sb("vault", "create", name, "--store", f"file://{store}", "--passphrase", f"env:{PASS_ENV}")
    sites = Path(sb.env["STANDBY_HOME"]) / "sites"
    sites.mkdir(parents=True, exist_ok=True)
    (sites / f"{name}.toml").write_text(f'plugin = "vault"\nvault = "{name}"\n')
    return VaultTarget(get_site(name, Path(sb.env["STANDBY_HOME"])))


def pipeline_round(
    sb: bp.Standby, work: Path, raw: Path, size: int, pieces: list[tuple[int, int]], name: str
) -> dict[str, Any]:
    """One timed pass of the chunk pipeline: read, skip zeroes, name, compress, seal, pack,
    store, commit, with 2 threads feeding one VaultWriter (the engine's write_many)."""
    target = pipeline_vault(sb, work, name)
    vm = VMSpec(id=f"pipeline-{name}", name=name, cpus=1, memory_mib=512,
                disks=(DiskSpec("vda", size, "raw"),))  # fmt: skip
    prot = ProtectionInfo(1, vm, "src", name)
    zero = bytes(PIECE)
    fd = os.open(raw, os.O_RDONLY)
    try:
        with target.open_writer(prot, 1, None) as writer:
            assert isinstance(writer, VaultWriter)

            def one(piece: tuple[int, int]) -> int:
                start, end = piece
                data = os.pread(fd, end - start, start)
                if data == (zero if len(data) == PIECE else bytes(len(data))):
                    return 0
                writer.write_many("vda", [(start, data)])
                return len(data)

            os.sync()
            cpu, start = time.process_time(), time.perf_counter()
            with ThreadPoolExecutor(THREADS, thread_name_prefix="bench-pipeline") as pool:
                data_bytes = sum(pool.map(one, pieces))
            writer.flush()
            writer.commit_point(1, {})
            seconds = time.perf_counter() - start
            cpu = time.process_time() - cpu
            mapped = writer.maps["vda"].mapped_bytes()
        compute = compute_floor(target, fd, pieces)
    finally:
        os.close(fd)
        target.close()
    store = work / f"{name}-store"
    stored = bp.dir_bytes(store / "packs")
    return {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 2),
        "data_bytes": data_bytes,
        "mapped_bytes": mapped,
        "stored_bytes": stored,
        "logical_gb_s": round(size / GB / seconds, 3),
        "data_gb_s": round(data_bytes / GB / seconds, 3),
        "compute_floor_seconds": compute,
        "store_floor_seconds": store_floor(work, stored),
    }


def compute_floor(target: VaultTarget, fd: int, pieces: list[tuple[int, int]]) -> float:
    """Seconds of the pipeline's CPU work alone, 2 threads: read, name and encode (compress
    and seal) every 1 MiB chunk of the data pieces, with no packing and no store."""
    vault, level = target.vault, target.opts.compression

    def one(piece: tuple[int, int]) -> None:
        start, end = piece
        view, pos = memoryview(os.pread(fd, end - start, start)), 0
        while pos < len(view):
            n = min(len(view) - pos, ((start + pos) // vault.chunk + 1) * vault.chunk - start - pos)
            part = view[pos : pos + n]
            vault.encode(vault.sealer.chunk_id(part), part, level)
            pos += n

    began = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(one, pieces))
    return round(time.perf_counter() - began, 3)


def store_floor(work: Path, nbytes: int) -> float:
    """Seconds of the pipeline's disk work alone: `nbytes` written as 16 MiB objects into a
    local store (each fsynced, as packs are), 2 threads, as the writer's threads store packs."""
    store, blob = LocalStore(work / "floor-store"), os.urandom(PACK_BYTES)
    os.sync()
    began = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(lambda i: store.put(f"packs/{i}", blob), range(-(-nbytes // PACK_BYTES))))
    seconds = time.perf_counter() - began
    bp.run(["rm", "-rf", str(work / "floor-store")])
    return round(seconds, 3)


def chunk_pipeline(sb: bp.Standby, work: Path, raw: Path, size: int) -> dict[str, Any]:
    """The pipeline's rounds (each into a new vault, removed after it); the median round."""
    pieces = data_pieces(raw, size)
    read = read_all(raw, pieces)
    runs = []
    for i in range(ROUNDS):
        name = f"pipe{i + 1}"
        runs.append(pipeline_round(sb, work, raw, size, pieces, name))
        bp.run(["rm", "-rf", str(work / f"{name}-store")])
    best = bp.median_run(runs, "seconds")
    return best | {"pieces": len(pieces), "bytes_in_data_extents": read, "threads": THREADS}


def setup(sb: bp.Standby, disk: Path, store: Path) -> None:
    """The source VM and site, the vault `v1` and its site `vlt`, the protection."""
    conn = lab.connect(sb.src_uri)
    try:
        size = disk.stat().st_size
        lab.create_vm(conn, bp.VM, disk.parent, [("vda", size, "qcow2")], qmp_socket=sb.qmp)
        sb.device = lab.qdev_path(conn.lookupByName(bp.VM), "vda")
    finally:
        conn.close()  # the CLI opens this embedded root next: one process at a time
    sb("sites", "add", "src", "--plugin", "physical", "--set", f'uri="{sb.src_uri}"')
    sb("vault", "create", "v1", "--store", f"file://{store}", "--passphrase", f"env:{PASS_ENV}")
    (Path(sb.env["STANDBY_HOME"]) / "sites" / "vlt.toml").write_text(
        'plugin = "vault"\nvault = "v1"\n'
    )
    sb("protect", bp.VM, "--from", "src", "--to", "vlt", "--rpo", "1h", "--retain", "3")


def replicate(sb: bp.Standby) -> dict[str, Any]:
    """`standby replicate VM --json` (a new process): the report, wall time and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = sb.replicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return report | {"cpu_seconds": round(cpu, 2)}


def vault_ls(sb: bp.Standby, store: Path) -> dict[str, Any]:
    """`standby vault ls v1 --json`'s sizes, and every file of the store directory."""
    data = json.loads(sb("vault", "ls", "v1", "--json"))
    keys = ("stored_bytes", "chunk_bytes", "logical_bytes", "packs", "chunks", "ratio")
    return {k: data[k] for k in keys} | {"store_dir_bytes": bp.dir_bytes(store)}


def peers(work: Path) -> tuple[dict[str, str], dict[str, str]]:
    """restic's and borg's environments: passwords, repositories, caches under `work`."""
    renv = os.environ | {
        "RESTIC_PASSWORD": PASSPHRASE,
        "RESTIC_REPOSITORY": str(work / "restic"),
        "RESTIC_CACHE_DIR": str(work / "restic-cache"),
        "RESTIC_COMPRESSION": "auto",
    }
    benv = bp.borg_env(work) | {"BORG_PASSPHRASE": PASSPHRASE}
    return renv, benv


def backup(
    sb: bp.Standby,
    renv: dict[str, str],
    benv: dict[str, str],
    work: Path,
    raw: Path,
    name: str,
    console: Console,
) -> dict[str, Any]:
    """One backup by each tool, then the sizes of the vault and of both repositories."""
    store, repo, brepo = work / "vstore", work / "restic", work / "borg"
    console.log(f"{name} backup: standby replicate")
    standby = replicate(sb)
    console.log(f"{name} backup: restic backup")
    restic = bp.restic_backup(renv, repo, raw)
    console.log(f"{name} backup: borg create")
    borg = borg_create(benv, brepo, raw, name)
    vault = vault_ls(sb, store)
    restic_bytes, borg_bytes = bp.dir_bytes(repo), bp.dir_bytes(brepo)
    wall, cycle = standby["wall_seconds"], standby["seconds"]
    return {
        "standby": standby,
        "restic": restic,
        "borg": borg,
        "restic_over_standby_wall": round(restic["seconds"] / wall, 2),
        "borg_over_standby_wall": round(borg["seconds"] / wall, 2),
        "restic_over_standby_cycle": round(restic["seconds"] / cycle, 2),
        "borg_over_standby_cycle": round(borg["seconds"] / cycle, 2),
        "stored": {
            "vault": vault,
            "restic_repo_bytes": restic_bytes,
            "borg_repo_bytes": borg_bytes,
            "vault_over_restic": round(vault["stored_bytes"] / restic_bytes, 3),
            "vault_over_borg": round(vault["stored_bytes"] / borg_bytes, 3),
            "vault_dir_over_restic": round(vault["store_dir_bytes"] / restic_bytes, 3),
            "vault_dir_over_borg": round(vault["store_dir_bytes"] / borg_bytes, 3),
        },
    }


def borg_create(env: dict[str, str], repo: Path, path: Path, name: str) -> dict[str, Any]:
    """One timed `borg create --compression zstd,3` (borg's default chunker; bp.borg_create
    fixes it at 64 KiB) of the raw master."""
    before = bp.dir_bytes(repo)
    cmd = ["borg", "create", "--json", "--compression", "zstd,3", f"{repo}::{name}", str(path)]
    seconds, out = bp.timed(cmd, env)
    stats = json.loads(out)["archive"]["stats"]
    return {
        "seconds": seconds,
        "deduplicated_size": stats["deduplicated_size"],
        "compressed_size": stats["compressed_size"],
        "original_size": stats["original_size"],
        "repo_growth": bp.dir_bytes(repo) - before,
    }


def served_cycles(sb: bp.Standby, raw: Path, size: int, console: Console) -> dict[str, Any]:
    """For information: the second backup's change served by the running service
    (`replicate --watch`, which opens the vault, its key and the sites once): a warm-up
    cycle, then ROUNDS times 655 new random 64 KiB guest writes and a timed replicate."""
    console.log(f"served by the running service: a warm-up, then {ROUNDS} changes of 1%")
    sb.serve()
    try:
        later = [(0, 0x42)]
        sb.guest_writes(later)
        first = replicate(sb)
        runs = []
        for i in range(ROUNDS):
            changes = bp.pick_changes(size, seed=bp.SEED + 2 + i)
            sb.guest_writes(changes)
            later += changes
            runs.append(replicate(sb))
    finally:
        sb.stop_service()
    bp.change_raw(raw, later)  # the raw master holds every change the guest has
    return bp.median_run(runs, "wall_seconds") | {"warm_up": first}


def restored_equals(sb: bp.Standby, work: Path, raw: Path) -> bool:
    """The newest point of the vault, restored to a raw file, equals `master.raw`."""
    out = work / "restored.raw"
    sb("vault", "restore-disk", "v1", bp.VM, "vda", "--out", str(out))
    try:
        return lab.images_equal(raw, out, "raw", "raw")
    finally:
        out.unlink(missing_ok=True)


def verdicts(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with the measured figure and whether it was met."""
    p, first, second = r["pipeline"], r["first"], r["second"]
    gb_s = {"target": TARGETS["pipeline_gb_s"], "measured": p["logical_gb_s"]}
    out: dict[str, dict[str, Any]] = {"pipeline_logical_gb_s": gb_s}
    for key, phase in (("first_x", first), ("second_x", second)):
        for peer in ("restic", "borg"):
            out[f"{key.split('_')[0]}_{peer}_over_standby_wall"] = {
                "target": TARGETS[key],
                "measured": phase[f"{peer}_over_standby_wall"],
            }
    for key, phase in (("first", first), ("second", second)):
        for peer in ("restic", "borg"):
            out[f"stored_after_{key}_vault_over_{peer}"] = {
                "target": TARGETS["stored_x"],
                "measured": phase["stored"][f"vault_over_{peer}"],
                "at_most": True,
            }
    for v in out.values():
        at_most = v.pop("at_most", False)
        v["met"] = v["measured"] <= v["target"] if at_most else v["measured"] >= v["target"]
    return out


def bench(work: Path, size: int, console: Console) -> dict[str, Any]:
    """The whole benchmark; returns every figure."""
    raw, disk = work / "master.raw", work / "src-disks" / f"{bp.VM}-vda.qcow2"
    disk.parent.mkdir(parents=True)
    console.log(f"building the {size / GIB:g} GiB source disk")
    facts = bp.build_disk(raw, disk, size)
    os.environ[PASS_ENV] = PASSPHRASE  # the CLI's vaults and the in-process pipeline's
    sb = bp.Standby(work)
    renv, benv = peers(work)
    try:
        console.log(f"chunk pipeline alone: {ROUNDS} rounds, {THREADS} threads")
        pipeline = chunk_pipeline(sb, work, raw, size)
        setup(sb, disk, work / "vstore")
        bp.run(["restic", "init", "--repository-version", "2"], renv)
        bp.run(["borg", "init", "-e", "repokey", str(work / "borg")], benv)
        first = backup(sb, renv, benv, work, raw, "first", console)
        changes = bp.pick_changes(size)
        console.log(f"changing {len(changes)} blocks of 64 KiB in the guest and the raw master")
        write_seconds = sb.guest_writes(changes)
        bp.change_raw(raw, changes)
        second = backup(sb, renv, benv, work, raw, "second", console)
        served = served_cycles(sb, raw, size, console)
        console.log("checking the vault's newest point against the raw master")
        equal = restored_equals(sb, work, raw)
    finally:
        sb.destroy()
    second |= {
        "changed_blocks": len(changes),
        "bytes_changed": len(changes) * bp.BLOCK,
        "guest_write_seconds": round(write_seconds, 2),
    }
    r = {
        "machine": bp.machine(work),
        "disk": facts,
        "pipeline": pipeline,
        "first": first,
        "second": second,
        "served": served
        | {
            "restic_second_over_served_wall": round(
                second["restic"]["seconds"] / served["wall_seconds"], 2
            ),
            "borg_second_over_served_wall": round(
                second["borg"]["seconds"] / served["wall_seconds"], 2
            ),
        },
        "point_equals_source": equal,
    }
    return r | {"targets": verdicts(r)}


def mib(n: int) -> str:
    return f"{n / MIB:,.1f}"


def show(r: dict[str, Any], console: Console) -> None:
    """The table of figures and the verdict on each target."""
    p, size = r["pipeline"], r["disk"]["size"]
    title = (f"{size / GIB:g} GiB disk, {mib(r['disk']['allocated_bytes'])} MiB allocated, "
             f"{r['machine']['nproc']} cores")  # fmt: skip
    t = Table("phase", "tool", "seconds", "x standby (wall)", "MiB read", "stored MiB",
              title=title)  # fmt: skip
    t.add_row("pipeline", f"VaultWriter, {p['threads']} threads (median of {ROUNDS})",
              f"{p['seconds']:.2f}", "", mib(p["data_bytes"]), mib(p["stored_bytes"]))  # fmt: skip
    for key in ("first", "second"):
        f = r[key]
        s, st = f["standby"], f["stored"]
        rows = [
            (key, "standby replicate (wall)", s["wall_seconds"], "", mib(s["bytes_read"]),
             mib(st["vault"]["stored_bytes"])),
            ("", "standby (report seconds)", s["seconds"], "", "", ""),
            ("", "restic backup", f["restic"]["seconds"], f["restic_over_standby_wall"],
             mib(f["restic"]["bytes_processed"]), mib(st["restic_repo_bytes"])),
            ("", "borg create zstd,3", f["borg"]["seconds"], f["borg_over_standby_wall"], "",
             mib(st["borg_repo_bytes"])),
        ]  # fmt: skip
        for phase, tool, secs, ratio, read, stored in rows:
            t.add_row(phase, tool, f"{secs:.2f}", str(ratio), read, stored)
    v = r["served"]
    t.add_row("served", f"standby replicate, served (wall, median of {ROUNDS})",
              f"{v['wall_seconds']:.2f}", f"restic {v['restic_second_over_served_wall']}, borg "
              f"{v['borg_second_over_served_wall']}", mib(v["bytes_read"]), "")  # fmt: skip
    t.add_row("", "standby, served (report seconds)", f"{v['seconds']:.2f}", "", "", "")
    console.print(t)
    console.print(
        f"pipeline: {p['logical_gb_s']} GB/s logical, {p['data_gb_s']} GB/s of data "
        f"({p['cpu_seconds']} CPU s in {p['seconds']} s); alone, the CPU work takes "
        f"{p['compute_floor_seconds']} s and the fsynced pack writes {p['store_floor_seconds']} s"
    )
    for key in ("first", "second"):
        console.print(f"{key} backup phases: {r[key]['standby'].get('phases')}")
    console.print(f"served phases: {r['served'].get('phases')}")
    for name, v in r["targets"].items():
        console.print(f"{name}: {v['measured']} (target {v['target']}): "
                      f"{'met' if v['met'] else 'NOT met'}")  # fmt: skip
    console.print(f"the vault's newest point equals the source: {r['point_equals_source']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--size-gib", type=float, default=4.0, help="source disk size (GiB)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/standby-vault-bench"))
    p.add_argument("--keep", action="store_true", help="keep disks, vaults and repositories")
    args = p.parse_args(argv)
    size = int(args.size_gib * GIB) // MIB * MIB
    work: Path = args.workdir.resolve()
    return bp.run_and_report(work, args.keep, 120, lambda c: bench(work, size, c), show)


if __name__ == "__main__":
    sys.exit(main())
