"""Benchmark of the AWS provider: a 4 GiB KVM disk replicated into EBS snapshots through the
EBS direct APIs of the AWS double (moto behind standby's EBS shim, HTTPS, keep-alive).

The source VM runs on bench_physical's deterministic disk (half holes, 10% zeros, text and
random data) in an embedded libvirt root. `standby replicate` (the CLI, a new process each
time) runs the initial sync, 3 rounds (unprotect + protect between them). The peer, in the
same run, taking turns: a plain loop of `put_snapshot_block` calls of the same non-zero
512 KiB blocks, read from the raw master with pread, SHA-256 each, then `complete_snapshot`:
once with 16 calls in flight (standby's put threads) and once one call at a time.
Incrementals: 1% of the disk changed inside the running VM, once as 655 scattered 64 KiB
blocks and once as 81 whole 512 KiB blocks; shipped
bytes are what crossed the wire (PutSnapshotBlock calls x 512 KiB, from the double's counters).
See benchmarks/README.md.

    uv run python benchmarks/bench_aws.py [--size-gib 4] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
import bench_physical as bp  # noqa: E402
from bench_vmware import phase, run_in  # noqa: E402

from standby.plugins.physical import lab  # noqa: E402
from standby.providers.aws import ebs  # noqa: E402
from support.aws import KEY_ID_ENV, SECRET_ENV, AwsEnv, aws_double  # noqa: E402

MIB, GIB = bp.MIB, bp.GIB
EBS_BLOCK = ebs.BLOCK
ROUNDS = 3
PUTTERS = 16  # AwsOptions.max_parallel_writes


def nonzero_blocks(raw: Path, size: int) -> list[int]:
    """Indexes of the raw master's 512 KiB blocks that hold data (holes and zeros skipped)."""
    out = []
    with raw.open("rb") as f:
        for idx in range(size // EBS_BLOCK):
            data = os.pread(f.fileno(), EBS_BLOCK, idx * EBS_BLOCK)
            if any(data):
                out.append(idx)
    return out


def peer_put(
    aws: AwsEnv, raw: Path, size: int, blocks: list[int], putters: int = PUTTERS
) -> dict[str, Any]:
    """The plain loop: start, put every block (`putters` in flight), complete, wait."""
    client = aws.client("ebs", pool=putters + 8)  # as standby's client: no connection churn
    start, cpu = time.perf_counter(), time.process_time()
    snap = ebs.start(client, size, None, {"peer": "1"}, "peer loop")
    fd = os.open(raw, os.O_RDONLY)
    try:

        def one(idx: int) -> tuple[int, bytes]:
            return idx, ebs.put_block(client, snap, idx, os.pread(fd, EBS_BLOCK, idx * EBS_BLOCK))

        if putters == 1:
            digests = dict(one(i) for i in blocks)
        else:
            with ThreadPoolExecutor(putters) as pool:
                digests = dict(pool.map(one, blocks))
    finally:
        os.close(fd)
    ebs.complete(client, snap, digests)
    ebs.wait_completed(aws.client("ec2"), [snap], 600, 0.05)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    aws.client("ec2").delete_snapshot(SnapshotId=snap)
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 2), "blocks": len(blocks)}


def replicate(sb: bp.Standby) -> dict[str, Any]:
    """`standby replicate` (a new process), with the CPU seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = sb.replicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return report | {"cpu_seconds": round(cpu, 2)}


def puts(aws: AwsEnv) -> int:
    return int(aws.moto.stats()["calls"].get("PutSnapshotBlock", 0))


def scattered(size: int, seed: int) -> list[tuple[int, int, int]]:
    """655 random 64 KiB blocks at 4 GiB (1%): (offset, length, fill)."""
    return [(o, bp.BLOCK, f) for o, f in bp.pick_changes(size, seed)]


def whole_blocks(size: int, seed: int) -> list[tuple[int, int, int]]:
    """1% of the disk as whole 512 KiB EBS blocks."""
    rng = random.Random(seed)
    picked = rng.sample(range(size // EBS_BLOCK), max(1, size // EBS_BLOCK // 100))
    return [(b * EBS_BLOCK, EBS_BLOCK, 1 + b % 255) for b in sorted(picked)]


def guest_write(sb: bp.Standby, changes: list[tuple[int, int, int]]) -> None:
    w = lab.QmpWriter(sb.qmp)
    try:
        for offset, length, fill in changes:
            w.qemu_io(sb.device, f"write -q -P {fill:#x} {offset} {length}")
            w.io_done()
    finally:
        w.close()


def point_equals(aws: AwsEnv, sb: bp.Standby, raw: Path, size: int) -> bool:
    """The newest point's snapshot equals the raw master (read back through the double)."""
    from standby.core.state import RecoveryPoint, State

    state = State.at(Path(sb.env["STANDBY_HOME"]))
    try:
        with state.session() as s:
            point = s.query(RecoveryPoint).order_by(RecoveryPoint.id.desc()).first()
            assert point is not None
            snap = point.ref["snapshots"]["vda"]
    finally:
        state.dispose()
    copy = raw.with_name("point.raw")
    aws.moto.save_image(copy, size, snapshot=snap)
    same = lab.images_equal(raw, copy, fmt_a="raw", fmt_b="raw")
    copy.unlink()
    return same


def setup(sb: bp.Standby, aws: AwsEnv, disk: Path) -> None:
    conn = lab.connect(sb.src_uri)
    try:
        size = disk.stat().st_size
        lab.create_vm(conn, bp.VM, disk.parent, [("vda", size, "qcow2")], qmp_socket=sb.qmp)
        sb.device = lab.qdev_path(conn.lookupByName(bp.VM), "vda")
    finally:
        conn.close()
    sb("sites", "add", "src", "--plugin", "physical", "--set", f'uri="{sb.src_uri}"')
    aws.make_dr_network()
    sites = Path(sb.env["STANDBY_HOME"]) / "sites"
    (sites / "aws.toml").write_text(aws.site_toml())
    sb.env = sb.env | {KEY_ID_ENV: os.environ[KEY_ID_ENV], SECRET_ENV: os.environ[SECRET_ENV]}


def incremental(
    sb: bp.Standby, aws: AwsEnv, raw: Path, changes: list[tuple[int, int, int]]
) -> dict[str, Any]:
    guest_write(sb, changes)
    with raw.open("r+b") as f:
        for offset, length, fill in changes:
            os.pwrite(f.fileno(), bytes([fill]) * length, offset)
    before = puts(aws)
    report = replicate(sb)
    changed = sum(n for _o, n, _f in changes)
    blocks = {
        i for o, n, _f in changes for i in range(o // EBS_BLOCK, (o + n - 1) // EBS_BLOCK + 1)
    }
    shipped = (puts(aws) - before) * EBS_BLOCK
    return report | {
        "changed_bytes": changed,
        "changed_ebs_block_bytes": len(blocks) * EBS_BLOCK,
        "shipped_bytes": shipped,
        "shipped_over_changed": round(shipped / changed, 3),
        "shipped_over_changed_ebs_blocks": round(shipped / (len(blocks) * EBS_BLOCK), 3),
    }


def bench(work: Path, size: int, console: Console) -> dict[str, Any]:
    raw, disk = work / "master.raw", work / "src-disks" / f"{bp.VM}-vda.qcow2"
    disk.parent.mkdir(parents=True)
    console.log(f"building the {size / GIB:g} GiB source disk")
    facts = bp.build_disk(raw, disk, size)
    blocks = nonzero_blocks(raw, size)
    sb = bp.Standby(work)
    with aws_double(work / "aws") as aws:
        try:
            setup(sb, aws, disk)
            initial, peer_initial, peer_plain = [], [], []
            for r in range(ROUNDS):
                sb("protect", bp.VM, "--from", "src", "--to", "aws", "--rpo", "1h",
                   "--retain", "3")  # fmt: skip
                console.log(f"round {r + 1}: standby replicate (initial)")
                initial.append(replicate(sb))
                console.log(f"round {r + 1}: the peer put loop")
                peer_initial.append(peer_put(aws, raw, size, blocks))
                console.log(f"round {r + 1}: the peer put loop, one call at a time")
                peer_plain.append(peer_put(aws, raw, size, blocks, putters=1))
                if r < ROUNDS - 1:
                    sb("unprotect", bp.VM, "--yes")
            equal_initial = point_equals(aws, sb, raw, size)
            console.log("incrementals: 1% scattered 64 KiB, then 1% whole 512 KiB blocks")
            inc_64k = incremental(sb, aws, raw, scattered(size, bp.SEED + 1))
            inc_512k = incremental(sb, aws, raw, whole_blocks(size, bp.SEED + 2))
            equal_inc = point_equals(aws, sb, raw, size)
        finally:
            sb.destroy()
    return {
        "machine": bp.machine(work),
        "disk": facts | {"nonzero_ebs_blocks": len(blocks)},
        "initial": phase(initial, peer_initial),
        "initial_vs_sequential_loop": {
            k: v for k, v in phase(initial, peer_plain).items() if k != "runs"
        },
        "incremental_64k": inc_64k,
        "incremental_512k": inc_512k,
        "point_equals_source": {"after_initial": equal_initial, "after_incrementals": equal_inc},
        "peer_put_mib_s": round(
            len(blocks) * EBS_BLOCK / MIB / statistics.median(p["seconds"] for p in peer_initial),
            1,
        ),
    }


def show(r: dict[str, Any], console: Console) -> None:
    f = r["initial"]
    console.print(
        f"initial: standby cycle {f['standby_cycle_s']} s, whole command {f['standby_wall_s']} s,"
        f" peer put loop {f['peer_s']} s -> {f['ratio_cycle']}x (cycle), {f['ratio_wall']}x "
        f"(command); peer {r['peer_put_mib_s']} MiB/s"
    )
    q = r["initial_vs_sequential_loop"]
    console.print(
        f"against the loop one call at a time: peer {q['peer_s']} s -> {q['ratio_cycle']}x "
        f"(cycle), {q['ratio_wall']}x (command)"
    )
    for key in ("incremental_64k", "incremental_512k"):
        i = r[key]
        console.print(
            f"{key}: cycle {i['seconds']} s, changed {i['changed_bytes']} B "
            f"({i['changed_ebs_block_bytes']} B of EBS blocks), shipped {i['shipped_bytes']} B -> "
            f"{i['shipped_over_changed']}x changed, {i['shipped_over_changed_ebs_blocks']}x the "
            "changed EBS blocks"
        )
    console.print(f"points equal the source: {r['point_equals_source']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gib", type=float, default=4.0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/standby-aws-bench"))
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    console = Console(stderr=True)
    size = int(args.size_gib * GIB) // MIB * MIB
    result = run_in(args.workdir, args.keep, console, lambda: bench(args.workdir, size, console))
    if result is None:
        return 2
    show(result, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
