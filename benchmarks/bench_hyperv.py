"""Benchmark of the Hyper-V source: a 4 GiB dynamic VHDX on the Hyper-V host double (WinRM
double + Samba from Debian on loopback) replicated to a KVM site.

The VHDX gets bench_physical's deterministic content (half holes, 10% zeros, text and random
data; `qemu-img convert -O vhdx`, so holes and zeros are unallocated blocks). `standby
replicate` (the CLI, a new process each time) runs the initial sync and incremental cycles
after 1% of the disk (655 random 64 KiB blocks) changed through the double's guest writes
(qemu-io, recorded in the double's RCT log). WinRM round trips are counted per cycle by the
double. The peer, in the same run, is a plain loop of the same bytes: the VHDX file read over
SMB 3 (smbprotocol, encrypted, 4 MiB reads, 4 in flight: standby's read threads for Hyper-V)
written into a local file and fsynced; for incrementals, the same number of 64 KiB reads at
the changed blocks' places in the file. Standby and the peer take turns, 3 rounds each.

    uv run python benchmarks/bench_hyperv.py [--size-gib 4] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
import bench_physical as bp  # noqa: E402
import bench_vmware as bv  # noqa: E402

from standby.plugins.hyperv.vhdx import LocalFile, open_layout  # noqa: E402
from standby.plugins.physical import lab  # noqa: E402
from support.hyperv import HyperVLab, start_hyperv  # noqa: E402

MIB, GIB, BLOCK = bp.MIB, bp.GIB, bp.BLOCK
PIECE = 4 * MIB
READERS = 4  # HyperVSource's max_parallel_reads
REQUEST = MIB  # one SMB read, as SmbFile sends them
ROUNDS = 3
VM = "bench01"


class Peer:
    """The VHDX file over SMB (smbclient, one handle per thread), written locally."""

    def __init__(self, hv: HyperVLab, rel: str) -> None:
        self.path = f"\\\\127.0.0.1\\{hv.samba.share}\\{rel}"
        self.port, self.user, self.password = hv.samba.port, hv.samba.user, hv.samba.password

    def copy(self, pieces: list[tuple[int, int]], dst: Path, size: int) -> dict[str, Any]:
        dst.unlink(missing_ok=True)
        start = time.monotonic()
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)
            chunks = [pieces[i::READERS] for i in range(READERS)]

            def one(mine: list[tuple[int, int]]) -> int:
                import smbclient

                moved, cache = 0, dict[str, Any]()
                smbclient.register_session(
                    "127.0.0.1", username=self.user, password=self.password, port=self.port,
                    encrypt=True, connection_cache=cache,
                )  # fmt: skip
                try:
                    with smbclient.open_file(
                        self.path, mode="rb", buffering=0, share_access="rw", port=self.port,
                        connection_cache=cache,
                    ) as f:  # fmt: skip
                        for offset, length in mine:
                            for at in range(offset, offset + length, REQUEST):
                                f.seek(at)
                                data = f.read(min(REQUEST, offset + length - at))
                                os.pwrite(fd, data, at)
                                moved += len(data)
                finally:
                    smbclient.reset_connection_cache(connection_cache=cache)
                return moved

            with ThreadPoolExecutor(READERS) as pool:
                moved = sum(pool.map(one, chunks))
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"seconds": round(time.monotonic() - start, 3), "bytes": moved}


def build_vhdx(work: Path, target: Path, size: int) -> dict[str, int]:
    raw = work / "content.raw"
    raw.touch()
    counts = bv.fill_flat(raw, size)
    target.unlink()
    bp.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic",
            str(raw), str(target)])  # fmt: skip
    raw.unlink()
    return counts


def file_offsets(vhdx: Path, changes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Where the changed guest blocks sit in the VHDX file (its BAT, read locally)."""
    src = LocalFile(vhdx)
    try:
        lay = open_layout(src, str(vhdx))
    finally:
        src.close()
    out = []
    for offset, _fill in changes:
        block, within = divmod(offset, lay.block_size)
        out.append(((lay.entry(block) >> 20) * MIB + within, BLOCK))
    return out


def bench(work: Path, size: int, console: Console) -> dict[str, Any]:
    hv = start_hyperv(work / "hv", env_prefix="STANDBY_BENCH_HV")
    sb = bp.Standby(work, vm=VM)
    try:
        disk = hv.model.add_vm(VM, [size // MIB]).disks[0]
        console.log(f"filling the {size / GIB:g} GiB VHDX")
        counts = build_vhdx(work, disk.path, size)
        home = Path(sb.env["STANDBY_HOME"])
        hv.write_site(home, "hv")
        sb.env = os.environ | {"STANDBY_HOME": str(home)}
        dr = ["--set", f'pool_dir="{sb.pool}"', "--set", 'domain_type="qemu"']
        sb("sites", "add", "dr", "--plugin", "physical", "--set", f'uri="{sb.dr_uri}"', *dr)
        peer = Peer(hv, f"{VM}\\{disk.path.name}")
        fsize = disk.path.stat().st_size
        pieces = [(o, min(PIECE, fsize - o)) for o in range(0, fsize, PIECE)]
        initial, peer_initial, trips = [], [], []
        for _ in range(ROUNDS):
            sb("protect", VM, "--from", "hv", "--to", "dr", "--rpo", "1h", "--retain", "3")
            before = len(hv.winrm.scripts)
            initial.append(sb.replicate())
            trips.append(len(hv.winrm.scripts) - before)
            bp.run(["sync"])
            peer_initial.append(peer.copy(pieces, work / "peer.raw", fsize))
            bp.run(["sync"])
            if len(initial) < ROUNDS:
                sb("unprotect", VM, "--yes")
        replica = bv.latest_files(home, VM)[disk.name]
        equal_full = lab.images_equal(disk.path, replica, fmt_a="vhdx")
        incremental, peer_inc, inc_trips = [], [], []
        for r in range(ROUNDS):
            changes = bp.pick_changes(size, seed=bp.SEED + 1 + r)
            for offset, fill in changes:
                hv.model.guest_write(VM, 0, offset, bytes([fill]) * BLOCK)
            bp.run(["sync"])
            before = len(hv.winrm.scripts)
            incremental.append(sb.replicate() | {"changed_bytes": len(changes) * BLOCK})
            inc_trips.append(len(hv.winrm.scripts) - before)
            bp.run(["sync"])
            blocks = file_offsets(disk.path, changes)
            peer_inc.append(peer.copy(blocks, work / "peer-inc.raw", fsize))
        served, peer_served, served_trips = _served(sb, hv, peer, disk, size, work)
        replica = bv.latest_files(home, VM)[disk.name]
        equal_inc = lab.images_equal(disk.path, replica, fmt_a="vhdx")
    finally:
        try:
            bv.destroy_appliances(sb.dr_uri)
        finally:
            hv.stop()
    out = bv.figures(work, size, counts, initial, peer_initial, incremental, peer_inc)
    return out | {
        "served": bv.phase(served, peer_served),
        "vhdx_file_bytes": fsize,
        "winrm_round_trips": {"initial": trips, "incremental": inc_trips, "served": served_trips},
        "replica_equals_vhdx": {"after_initial": equal_full, "after_incrementals": equal_inc},
    }


def _served(
    sb: bp.Standby, hv: HyperVLab, peer: Peer, disk: Any, size: int, work: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """Incrementals answered by the running service (`replicate --watch`), which keeps the
    sites' WinRM session and SMB sessions between cycles; a first small cycle warms it up."""
    sb.serve()
    try:
        hv.model.guest_write(VM, 0, 0, bytes([0x42]) * BLOCK)
        sb.replicate()
        served, peer_served, trips = [], [], []
        for r in range(ROUNDS):
            changes = bp.pick_changes(size, seed=bp.SEED + 11 + r)
            for offset, fill in changes:
                hv.model.guest_write(VM, 0, offset, bytes([fill]) * BLOCK)
            bp.run(["sync"])
            before = len(hv.winrm.scripts)
            served.append(sb.replicate() | {"changed_bytes": len(changes) * BLOCK})
            trips.append(len(hv.winrm.scripts) - before)
            bp.run(["sync"])
            blocks = file_offsets(disk.path, changes)
            peer_served.append(peer.copy(blocks, work / "peer-s.raw", size))
        return served, peer_served, trips
    finally:
        sb.stop_service()


def show(r: dict[str, Any], console: Console) -> None:
    console.print(bv.phase_table(r, "Hyper-V source (WinRM double + Samba) -> KVM"))
    f = r["served"]
    console.print(f"incremental served by the running service: cycle {f['standby_cycle_s']} s, "
                  f"command {f['standby_wall_s']} s, peer {f['peer_s']} s: "
                  f"{f['ratio_cycle']}x by the cycle, "
                  f"{f['ratio_wall']}x by the command")  # fmt: skip
    console.print(f"shipped / changed: {r['incremental']['shipped_over_changed']}x; WinRM round "
                  f"trips per cycle: {r['winrm_round_trips']}; replica equals the VHDX: "
                  f"{r['replica_equals_vhdx']}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--size-gib", type=float, default=4.0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/standby-hyperv-bench"))
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    console = Console(stderr=True)
    size = int(args.size_gib * GIB) // MIB * MIB
    result = bv.run_in(args.workdir, args.keep, console, lambda: bench(args.workdir, size, console))
    if result is None:
        return 2
    show(result, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
