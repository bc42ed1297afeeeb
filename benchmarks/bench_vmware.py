"""Benchmark of the VMware plugin: a 4 GiB VMDK on the vcsim double replicated to a KVM site
(`--to kvm`, the default) or to a second vcsim as the DR site (`--to vmware`: the replica
written by the data mover onto the DR datastore; then a drill's time, the point converted
into a flat VMDK and the VM created and started).

The double's VM gets bench_physical's deterministic disk content (half holes, 10% zeros, text
and random data) in its flat VMDK. `standby replicate` (the CLI, a new process each time) runs
the initial sync and incremental cycles after 1% of the disk (655 random 64 KiB blocks) changed
through the double's guest-write endpoint (so CBT records them). The peer, in the same run, is
a plain loop of the same bytes: ranged HTTPS GETs of the same flat file through the same
datastore file service, 8 in flight (standby's read threads), written into a local sparse file
and fsynced. Standby and the peer take turns, 3 rounds each. See benchmarks/README.md.

    uv run python benchmarks/bench_vmware.py [--size-gib 4] [--to kvm|vmware] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
import bench_physical as bp  # noqa: E402
from doubles.vcsim_proc import Vcsim, start_vcsim  # noqa: E402

from standby.core.state import RecoveryPoint, State  # noqa: E402
from standby.plugins.physical import lab  # noqa: E402
from support.vmware import write_vc_site  # noqa: E402

MIB, GIB, BLOCK = bp.MIB, bp.GIB, bp.BLOCK
PIECE = 4 * MIB  # the engine's largest read
READERS = 8  # VMwareSource's max_parallel_reads
ROUNDS = 3


def fill_flat(flat: Path, size: int) -> dict[str, int]:
    """bench_physical's regions written into the flat file (zeros written, holes left)."""
    rng = random.Random(bp.SEED)
    counts = dict.fromkeys(bp.KINDS, 0)
    with flat.open("r+b") as f:
        f.truncate(size)
        for kind, offset, length in bp.plan_regions(size, rng):
            counts[kind] += length
            if kind == "text":
                os.pwrite(f.fileno(), bp.text_block(length, offset // 64), offset)
            elif kind == "random":
                os.pwrite(f.fileno(), rng.randbytes(length), offset)
            elif kind == "zero":
                os.pwrite(f.fileno(), bytes(length), offset)
    return counts


def allocated(path: Path, size: int) -> list[tuple[int, int]]:
    """The file's data ranges (SEEK_DATA/SEEK_HOLE), cut into engine-sized pieces."""
    out, pos = [], 0
    with path.open("rb") as f:
        while pos < size:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            end = min(os.lseek(f.fileno(), start, os.SEEK_HOLE), size)
            out += [(o, min(PIECE, end - o)) for o in range(start, end, PIECE)]
            pos = end
    return out


class Peer:
    """Ranged GETs of the flat file through the datastore file service, written locally."""

    def __init__(self, sim: Vcsim, flat_url: str) -> None:
        self.sim, self.url = sim, flat_url
        self.auth = base64.b64encode(f"{sim.user}:{sim.password}".encode()).decode()
        self.local = threading.local()

    def _conn(self) -> http.client.HTTPSConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(
                self.sim.host, self.sim.port, context=self.sim.ssl_context, timeout=120
            )
            self.local.conn = conn
        return conn

    def get(self, offset: int, length: int) -> bytes:
        conn = self._conn()
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        conn.request("GET", self.url, headers={"Authorization": f"Basic {self.auth}", **headers})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status not in (200, 206) or len(body) != length:
            raise RuntimeError(f"peer GET {offset}+{length}: HTTP {resp.status}")
        return body

    def copy(self, pieces: list[tuple[int, int]], dst: Path, size: int) -> dict[str, Any]:
        """Copy the pieces into `dst` (sparse, `size` long), fsync; timed."""
        dst.unlink(missing_ok=True)
        start = time.monotonic()
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)

            def one(piece: tuple[int, int]) -> int:
                os.pwrite(fd, self.get(*piece), piece[0])
                return piece[1]

            with ThreadPoolExecutor(READERS) as pool:
                moved = sum(pool.map(one, pieces))
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"seconds": round(time.monotonic() - start, 3), "bytes": moved}


def destroy_appliances(uri: str) -> None:
    """The DR root's replica appliances (paused QEMUs kept between cycles)."""
    conn = lab.connect(uri)
    try:
        for dom in conn.listAllDomains():
            if dom.name().startswith("standby-replica-"):
                lab.destroy_vm(conn, dom.name())
    finally:
        conn.close()


def latest_files(home: Path, vm: str) -> dict[str, Path]:
    state = State.at(home)
    try:
        with state.session() as s:
            prot = state.protection(s, vm)
            points = [p for p in prot.points if p.state == "visible"]
            point: RecoveryPoint = points[-1]
            return {d: Path(f) for d, f in point.ref["files"].items()}
    finally:
        state.dispose()


def bench(work: Path, size: int, console: Console, to: str = "kvm") -> dict[str, Any]:
    sim = start_vcsim(work / "vcsim", vms=1, disk_mb=size // MIB)
    drsim = start_vcsim(work / "vcdr", vms=0) if to == "vmware" else None
    sb = bp.Standby(work, vm="")
    drill: dict[str, Any] = {}
    try:
        (disk,) = sim.disks(vm := "DC0_C0_RP0_VM0")
        flat, key = Path(disk["file"]), int(disk["deviceKey"])
        console.log(f"filling the {size / GIB:g} GiB flat VMDK")
        counts = fill_flat(flat, size)
        home = Path(sb.env["STANDBY_HOME"])
        write_vc_site(home, sim)
        sb.env = sb.env | {"STANDBY_TEST_VC_PASSWORD": sim.password}
        if drsim is not None:
            keys = {"datastore": drsim.datastore, "datastore_path": str(drsim.datastore_dir)}
            write_vc_site(home, drsim, "dr", password_env="STANDBY_TEST_VCDR_PASSWORD", **keys)
            sb.env = sb.env | {"STANDBY_TEST_VCDR_PASSWORD": drsim.password}
        else:
            dr = ["--set", f'pool_dir="{sb.pool}"', "--set", 'domain_type="qemu"']
            sb("sites", "add", "dr", "--plugin", "physical", "--set", f'uri="{sb.dr_uri}"', *dr)
        sb.vm = vm
        rel = os.path.relpath(flat, Path(sim.datastore_dir))
        peer = Peer(sim, f"/folder/{rel}?dcPath={sim.datacenter}&dsName={sim.datastore}")
        pieces = allocated(flat, size)
        initial, peer_initial = [], []
        for _ in range(ROUNDS):
            sb("protect", vm, "--from", "vc", "--to", "dr", "--rpo", "1h", "--retain", "3")
            initial.append(sb.replicate())
            bp.run(["sync"])
            peer_initial.append(peer.copy(pieces, work / "peer.raw", size))
            bp.run(["sync"])
            if len(initial) < ROUNDS:
                sb("unprotect", vm, "--yes")
        equal_full = lab.images_equal(flat, latest_files(home, vm)[f"disk{key}"], fmt_a="raw")
        incremental, peer_inc = [], []
        for r in range(ROUNDS):
            changes = bp.pick_changes(size, seed=bp.SEED + 1 + r)
            for offset, fill in changes:
                sim.write(vm, key, offset, bytes([fill]) * BLOCK)
            bp.run(["sync"])
            incremental.append(sb.replicate() | {"changed_bytes": len(changes) * BLOCK})
            bp.run(["sync"])
            blocks = [(o, BLOCK) for o, _ in changes]
            peer_inc.append(peer.copy(blocks, work / "peer-inc.raw", size))
        equal_inc = lab.images_equal(flat, latest_files(home, vm)[f"disk{key}"], fmt_a="raw")
        if drsim is not None:
            drill = drill_times(sb, vm)
    finally:
        try:
            if drsim is None:
                destroy_appliances(sb.dr_uri)
        finally:
            sim.stop()
            if drsim is not None:
                drsim.stop()
    return figures(work, size, counts, initial, peer_initial, incremental, peer_inc) | {
        "to": to,
        "replica_equals_vmdk": {"after_initial": equal_full, "after_incrementals": equal_inc},
        **({"drill": drill} if drill else {}),
    }


def drill_times(sb: bp.Standby, vm: str) -> dict[str, Any]:
    """A test failover at the vSphere DR site and its cleanup, whole commands, timed."""
    out: dict[str, Any] = {}
    for name, args in (("failover_test_s", ["failover", vm, "--test"]),
                       ("cleanup_s", ["failover", "cleanup", vm])):  # fmt: skip
        wall, _ = bp.timed([sb.exe, *args], sb.env)
        out[name] = round(wall, 3)
    return out


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(float(r[key]) for r in runs), 3)


def phase(runs: list[dict[str, Any]], peer_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of one phase, standby against the peer, and every run."""
    cyc, wall, peer = (
        _median(runs, "seconds"),
        _median(runs, "wall_seconds"),
        _median(peer_runs, "seconds"),
    )
    return {
        "standby_cycle_s": cyc,
        "standby_wall_s": wall,
        "peer_s": peer,
        "ratio_cycle": round(peer / cyc, 2),
        "ratio_wall": round(peer / wall, 2),
        "runs": runs,
        "peer_runs": peer_runs,
    }


def figures(
    work: Path,
    size: int,
    counts: dict[str, int],
    initial: list[dict[str, Any]],
    peer_initial: list[dict[str, Any]],
    incremental: list[dict[str, Any]],
    peer_inc: list[dict[str, Any]],
) -> dict[str, Any]:
    shipped = statistics.median(r["bytes_written"] / r["changed_bytes"] for r in incremental)
    return {
        "machine": bp.machine(work),
        "disk": {"size": size, **{f"{k}_bytes": v for k, v in counts.items()}},
        "initial": phase(initial, peer_initial),
        "incremental": phase(incremental, peer_inc) | {"shipped_over_changed": round(shipped, 3)},
    }


def phase_table(r: dict[str, Any], title: str) -> Table:
    """The initial and incremental phases of a result, standby against the peer."""
    cols = ("phase", "standby cycle s", "standby whole command s", "peer s", "x peer (cycle)",
            "x peer (command)")  # fmt: skip
    t = Table(*cols, title=title)
    for phase in ("initial", "incremental"):
        f = r[phase]
        t.add_row(phase, str(f["standby_cycle_s"]), str(f["standby_wall_s"]), str(f["peer_s"]),
                  str(f["ratio_cycle"]), str(f["ratio_wall"]))  # fmt: skip
    return t


def show(r: dict[str, Any], console: Console) -> None:
    console.print(phase_table(r, f"VMware source (vcsim) -> {r.get('to', 'kvm')}"))
    console.print(f"shipped / changed: {r['incremental']['shipped_over_changed']}x; "
                  f"replica equals the VMDK: {r['replica_equals_vmdk']}")  # fmt: skip
    if r.get("drill"):
        console.print(f"drill at the vSphere DR site: {r['drill']}")


def run_in(workdir: Path, keep: bool, console: Console, bench_fn: Any) -> dict[str, Any] | None:
    """`bench_fn()` in an empty `workdir` (None if it holds an earlier run), its result kept
    in workdir/results.json and printed; everything else removed unless `keep`."""
    if workdir.exists() and any(workdir.iterdir()):
        console.print(f"{workdir} holds an earlier run: delete it first")
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result: dict[str, Any] = bench_fn()
    finally:
        if not keep:
            for child in workdir.iterdir():
                if child.name != "results.json":
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
    (workdir / "results.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gib", type=float, default=4.0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/standby-vmware-bench"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("--to", choices=("kvm", "vmware"), default="kvm")
    args = p.parse_args(argv)
    console = Console(stderr=True)
    size = int(args.size_gib * GIB) // MIB * MIB
    result = run_in(
        args.workdir, args.keep, console, lambda: bench(args.workdir, size, console, args.to)
    )
    if result is None:
        return 2
    show(result, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
