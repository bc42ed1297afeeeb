"""RPO under churn: `standby replicate --watch` keeping a VM whose disk never stops changing.

A KVM source VM (TCG here) takes a sustained stream of random 64 KiB guest writes (default
20 MB/s, incompressible data from a pool of random blocks) for `--minutes` while
`standby replicate --watch --json` runs with `--rpo 30s`. Every cycle's achieved RPO (the
commit time minus the previous point's snapshot time: the worst data-loss window just before
the new point appeared) is collected; at the end the churn stops, one more cycle runs and
the newest point is compared with the source disk byte for byte. See benchmarks/README.md.

    uv run python benchmarks/bench_rpo.py [--minutes 10] [--rate-mb 20] [--size-gib 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))

from bench_physical import (
    BLOCK,
    GIB,
    MIB,
    Standby,
    build_disk,
    machine,
    run,
    run_and_report,
)

from standby.plugins.physical import lab

VM = "churn01"
POOL_BLOCKS = 64


class Churn(threading.Thread):
    """Random 64 KiB writes at `rate` bytes/s through the VM's extra QMP monitor.

    Paced on an absolute schedule with 4 writes in flight; after a stall it catches up at most
    one second's worth at once. Data comes from a pool of random blocks (incompressible)."""

    def __init__(self, sock: Path, device: str, size: int, rate: float, pool: Path) -> None:
        super().__init__(daemon=True)
        self.sock, self.device, self.size, self.rate = sock, device, size, rate
        self.pool = sorted(str(p) for p in pool.iterdir())
        self.stop = threading.Event()
        self.done = 0
        self.started_at = self.ended_at = 0.0
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # reported with the results, never silently
            self.error = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        w = lab.QmpWriter(self.sock)
        rng = random.Random(7)
        per_second = self.rate / BLOCK
        blocks, inflight, sent = self.size // BLOCK, 0, 0
        self.started_at = t0 = time.monotonic()
        while not self.stop.is_set() or inflight:
            now = time.monotonic()
            due = int((now - t0) * per_second)
            sent = max(sent, due - int(per_second))  # catch up at most one second's worth
            while not self.stop.is_set() and inflight < 4 and sent < due:
                off = rng.randrange(blocks) * BLOCK
                w.qemu_io(self.device, f"write -q -s {rng.choice(self.pool)} {off} {BLOCK}")
                sent, inflight = sent + 1, inflight + 1
            if inflight:
                w.io_done()
                inflight -= 1
                self.done += 1
            else:
                time.sleep(max(0.0, t0 + (sent + 1) / per_second - time.monotonic()))
        w.qemu_io(self.device, "flush")
        w.io_done()
        self.ended_at = time.monotonic()
        w.close()


class Watch:
    """`standby replicate --watch --json` in the background, its cycle reports collected."""

    def __init__(self, sb: Standby) -> None:
        self.proc = subprocess.Popen(
            [sb.exe, "replicate", "--watch", "--json", "--interval", "1"],
            env=sb.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reports: list[dict[str, Any]] = []
        self.rss: list[int] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        threading.Thread(target=self._sample_rss, daemon=True).start()

    def _sample_rss(self) -> None:
        """The service's resident memory every 5 s (bounded memory under churn)."""
        while self.proc.poll() is None:
            try:
                for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:") and int(line.split()[1]) > 0:
                        self.rss.append(int(line.split()[1]) * 1024)  # (0 before the exec)
            except OSError:
                return
            time.sleep(5)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.reports.append(json.loads(line) | {"arrived": time.time()})

    def wait_for(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.reports) < n:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"--watch made {len(self.reports)} points, not {n}")
            time.sleep(0.2)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            dump = subprocess.run(
                ["py-spy", "dump", "--pid", str(self.proc.pid)], capture_output=True, text=True
            ) if shutil.which("py-spy") else None  # fmt: skip
            self.proc.kill()
            self.proc.communicate()
            where = dump.stdout if dump else "(py-spy not installed)"
            raise RuntimeError(f"--watch did not stop within 120 s of SIGINT:\n{where}") from None
        self.reader.join(timeout=10)
        return err


def random_pool(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(11)
    for i in range(POOL_BLOCKS):
        (directory / f"b{i:02d}").write_bytes(rng.randbytes(BLOCK))
    return directory


def setup(sb: Standby, work: Path, size: int, console: Console) -> tuple[Path, str]:
    """The source disk, the VM with its extra QMP monitor, both sites, the protection."""
    disk = work / "src-disks" / f"{VM}-vda.qcow2"
    disk.parent.mkdir(parents=True)
    console.log(f"building the {size / GIB:g} GiB source disk")
    build_disk(work / "master.raw", disk, size)
    (work / "master.raw").unlink()
    sock = work / "q.sock"
    conn = lab.connect(sb.src_uri)
    try:
        lab.create_vm(
            conn, VM, disk.parent, [("vda", size, "qcow2")], domain_type="qemu",
            cache="unsafe", qmp_socket=sock,
        )  # fmt: skip
        device = lab.qdev_path(conn.lookupByName(VM), "vda")
    finally:
        conn.close()
    dr = ["--set", f'pool_dir="{sb.pool}"', "--set", 'domain_type="qemu"']
    sb("sites", "add", "src", "--plugin", "physical", "--set", f'uri="{sb.src_uri}"')
    sb("sites", "add", "dr", "--plugin", "physical", "--set", f'uri="{sb.dr_uri}"', *dr)
    return sock, device


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def bench(work: Path, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    size = int(args.size_gib * GIB) // MIB * MIB
    sb = Standby(work, VM)
    try:
        sock, device = setup(sb, work, size, console)
        keep = ["--retain", str(args.retain)] if args.retain else []
        sb("protect", VM, "--from", "src", "--to", "dr", "--rpo", args.rpo, *keep)
        console.log("initial sync")
        initial = sb.replicate()
        churn = Churn(sock, device, size, args.rate_mb * 1e6, random_pool(work / "pool"))
        console.log(f"churn {args.rate_mb} MB/s for {args.minutes} min under replicate --watch")
        churn_wall = datetime.now(UTC).timestamp()
        watch = Watch(sb)
        churn.start()
        churn.join(timeout=args.minutes * 60)
        churn.stop.set()
        churn.join()
        stopped = time.time()
        console.log("churn stopped; waiting for a cycle that starts after it")
        deadline = time.monotonic() + 300
        while not any(r["arrived"] - r["seconds"] > stopped for r in watch.reports):
            if time.monotonic() > deadline or watch.proc.poll() is not None:
                raise RuntimeError("no cycle after the churn stopped")
            time.sleep(0.5)
        err = watch.stop()
        equal = lab.images_equal(work / "src-disks" / f"{VM}-vda.qcow2", sb.replica())
    finally:
        sb.destroy()
    out = figures(args, initial, watch.reports, churn, churn_wall, stopped, equal, err, work)
    rss = watch.rss or [0]
    return out | {
        "service_rss_mib": {"first": rss[0] >> 20, "max": max(rss) >> 20, "last": rss[-1] >> 20}
    }


def figures(
    args: argparse.Namespace,
    initial: dict[str, Any],
    reports: list[dict[str, Any]],
    churn: Churn,
    churn_wall: float,
    stopped: float,
    equal: bool,
    err: str,
    work: Path,
) -> dict[str, Any]:
    """Per-cycle RPO under churn (cycles that began and ended while the churn ran)."""
    under = [r for r in reports if r["rpo_seconds"] is not None and r["arrived"] <= stopped]
    under = [r for r in under if r["arrived"] - r["seconds"] >= churn_wall]
    rpo = [r["rpo_seconds"] for r in under]
    churn_seconds = churn.ended_at - churn.started_at
    shipped = sum(r["bytes_written"] for r in under)
    last_start = (under[-1]["arrived"] - under[-1]["seconds"]) if under else 0
    span = last_start - churn_wall if under else 0  # changes made up to the last snapshot
    return {
        "machine": machine(work),
        "settings": {
            "minutes": args.minutes,
            "rate_mb_s": args.rate_mb,
            "size_bytes": int(args.size_gib * GIB),
            "rpo_target": args.rpo,
        },
        "initial": initial,
        "churn": {
            "writes": churn.done,
            "seconds": round(churn_seconds, 1),
            "mb_s": round(churn.done * BLOCK / churn_seconds / 1e6, 2) if churn_seconds else 0,
            "error": churn.error,
        },
        "cycles_under_churn": len(under),
        "rpo_seconds": {
            "p50": round(percentile(rpo, 50), 2) if rpo else None,
            "p99": round(percentile(rpo, 99), 2) if rpo else None,
            "max": round(max(rpo), 2) if rpo else None,
            "all": [round(x, 2) for x in rpo],
        },
        "cycle_seconds": {
            "p50": round(statistics.median(r["seconds"] for r in under), 2) if under else None,
            "max": round(max(r["seconds"] for r in under), 2) if under else None,
        },
        "shipped_mb_s": round(shipped / span / 1e6, 2) if span else 0,
        "shipped_bytes": shipped,
        "replica_equals_source_after_churn": equal,
        "watch_stderr_tail": err.splitlines()[-5:],
    }


def show(r: dict[str, Any], console: Console) -> None:
    t = Table("figure", "value", title=f"RPO under churn ({r['settings']})")
    rpo, ch = r["rpo_seconds"], r["churn"]
    rows = [
        ("guest writes (achieved)", f"{ch['mb_s']} MB/s, {ch['writes']} x 64 KiB"),
        ("cycles under churn", str(r["cycles_under_churn"])),
        ("achieved RPO p50 / p99 / max", f"{rpo['p50']} / {rpo['p99']} / {rpo['max']} s"),
        ("cycle seconds p50 / max", f"{r['cycle_seconds']['p50']} / {r['cycle_seconds']['max']}"),
        ("shipped", f"{r['shipped_mb_s']} MB/s"),
        ("replica equals source at the end", str(r["replica_equals_source_after_churn"])),
        ("service RSS first / max / last (MiB)", str(r["service_rss_mib"])),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate-mb", type=float, default=20.0, help="guest writes, MB/s (10^6)")
    p.add_argument("--size-gib", type=float, default=4.0)
    p.add_argument("--rpo", default="30s")
    p.add_argument("--retain", type=int, default=None, help="points kept (policy default)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/standby-rpo"))
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    work: Path = args.workdir.resolve()
    if os.geteuid() != 0:
        raise SystemExit("run as root (embedded libvirt roots start QEMU as root)")
    run(["qemu-img", "--version"])
    return run_and_report(work, args.keep, 120, lambda c: bench(work, args, c), show)


if __name__ == "__main__":
    sys.exit(main())
