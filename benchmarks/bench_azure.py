"""Benchmark of the Azure provider: initial sync of the physical benchmark disk into Azurite.

One run builds bench_physical's deterministic, half-allocated qcow2 disk, runs a VM on it in an
embedded libvirt root, and times the first `standby replicate` into page blobs in Azurite (HTTPS,
pinned certificate; a fake ARM answers protect's VM-size check), with the default
`verify = auto` (every Put Page carries a Content-MD5 the service checks, and a sample is read
back), `verify = full` (everything read back) and `verify = none`. Its raw ceiling is a plain
loop of `upload_page` calls of the same bytes into the same Azurite, as many in flight as
standby. See benchmarks/README.md for the method.

    uv run python benchmarks/bench_azure.py [--size-gib 4] [--workdir DIR] [--runs 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from azure.storage.blob import BlobServiceClient
from rich.console import Console
from rich.table import Table

from standby.core.extents import BLOCK, align_out, split
from standby.plugins.physical import lab
from standby.plugins.physical.source import PhysicalSource
from standby.providers.azure import vhd
from standby.providers.azure.storage import MAX_PUT_PAGE
from standby.providers.azure.target import AzureTarget

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
import bench_physical as bp  # noqa: E402

import support.azure as sa  # noqa: E402

MIB = bp.MIB
WORKERS = min(
    PhysicalSource.capabilities.max_parallel_reads, AzureTarget.capabilities.max_parallel_writes
)
"""The engine's copy pool when it is not given workers (its verify pool is also 4)."""
VARIANTS = {  # result key -> how it is run
    "standby_default": "standby, verify = auto (default)",
    "standby_verify_full": "standby, verify = full",
    "standby_verify_none": "standby, verify = none",
    "raw_parallel": f"raw upload_page loop, {WORKERS} in flight",
    "raw_single": "raw upload_page loop, 1 in flight",
}
COLUMNS = ("measurement", "median s", "all runs (s)", "MiB/s shipped", "MiB/s allocated",
           "x raw", "CPU s Azurite/QEMU/client")  # fmt: skip
Piece = tuple[int, bytes]


def pieces(raw: Path, qcow2: Path, size: int) -> list[Piece]:
    """What standby writes on a first sync, as (offset, bytes) runs read from the raw copy: the
    allocated extents widened to 64 KiB blocks, cut at the engine's 4 MiB unit boundaries,
    without their all-zero blocks (a new page blob reads as zeros)."""
    extents = json.loads(bp.run(["qemu-img", "map", "--output=json", str(qcow2)]))
    data_extents = ((e["start"], e["start"] + e["length"]) for e in extents if e["data"])
    zero, out = bytes(BLOCK), []
    with raw.open("rb") as f:
        for start, end in split(align_out(data_extents, size), MAX_PUT_PAGE):
            data, first = os.pread(f.fileno(), end - start, start), -1
            for off in range(start, end + BLOCK, BLOCK):  # one step past the end closes a run
                blk = data[off - start : min(end, off + BLOCK) - start]
                if blk and blk != zero[: len(blk)]:
                    first = off if first < 0 else first
                elif first >= 0:
                    out.append((first, data[first - start : min(end, off) - start]))
                    first = -1
    return out


class Cpu:
    """CPU seconds of Azurite, of the source VM's QEMU (the NBD server standby reads from) and
    of this process with its finished children (the standby command, or the raw loop)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def now(self) -> dict[str, float]:
        tick, out = os.sysconf("SC_CLK_TCK"), {}
        for name, pid in self.pids.items():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return out | {"client": time.process_time() + kids.ru_utime + kids.ru_stime}

    def around(self, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """fn's result with the CPU seconds each spent while it ran."""
        before = self.now()
        result = fn()
        return result | {"cpu": {k: round(v - before[k], 2) for k, v in self.now().items()}}


class AzureStandby(bp.Standby):
    """bench_physical's CLI driver, with the source root only and an Azure site at the doubles."""

    def __init__(self, work: Path, az: sa.AzureEnv) -> None:
        super().__init__(work)  # the environment has the doubles' secrets (azure_doubles)
        self.home, self.root, self.az, self.cpu = work / "home", work / "src-host", az, Cpu({})

    def setup(self, disk: Path) -> None:
        """Start the source VM, add the source site, the Azure site and the verify policies."""
        conn = lab.connect(self.src_uri)
        try:
            lab.create_vm(conn, bp.VM, disk.parent, [("vda", disk.stat().st_size, "qcow2")])
        finally:
            conn.close()  # the CLI opens this embedded root next: one process at a time
        self("sites", "add", "src", "--plugin", "physical", "--set", f'uri="{self.src_uri}"')
        (self.home / "sites" / "azure.toml").write_text(self.az.site_toml("replicas"))
        (self.home / "policies").mkdir(exist_ok=True)
        (self.home / "policies" / "noverify.toml").write_text('verify = "none"\n')
        (self.home / "policies" / "fullverify.toml").write_text('verify = "full"\n')
        self.cpu.pids = {"azurite": self.az.azurite.pid, "qemu": self.qemu_pid()}

    def qemu_pid(self) -> int:
        """The source VM's QEMU: its command line names the VM and the embedded root."""
        for path in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                cmd = path.read_bytes()
            except OSError:
                continue  # gone meanwhile
            if f"guest={bp.VM},".encode() in cmd and str(self.root).encode() in cmd:
                return int(path.parent.name)
        raise RuntimeError(f"no QEMU process of {bp.VM} under {self.root}")

    def initial_sync(self, policy: str) -> dict[str, Any]:
        """A fresh protection (new blobs), its timed first cycle, then unprotect (blobs go)."""
        self("protect", bp.VM, "--from", "src", "--to", "azure", "--policy", policy)
        try:
            return self.cpu.around(self.replicate)
        finally:
            self("unprotect", bp.VM, "--yes")

    def destroy(self) -> None:
        """Destroy the source VM (there is no replica appliance with an Azure target)."""
        conn = lab.connect(self.src_uri)
        try:
            if bp.VM in {d.name() for d in conn.listAllDomains()}:
                lab.destroy_vm(conn, bp.VM)
        finally:
            conn.close()


def blob_service(az: sa.AzureEnv) -> BlobServiceClient:
    """A plain client of Azurite: account key, the pinned certificate, SDK defaults otherwise."""
    key = {"account_name": az.azurite.account, "account_key": az.azurite.key}
    return BlobServiceClient(az.azurite.endpoint, credential=key, connection_verify=str(az.cert))


def raw_upload(
    az: sa.AzureEnv, plan: list[Piece], size: int, workers: int, name: str, cpu: Cpu
) -> dict[str, Any]:
    """Seconds (and CPU) of a plain loop of `upload_page` calls of `plan` into a new page blob."""
    service = blob_service(az)
    blob = service.get_blob_client("rawceiling", name)
    blob.create_page_blob(vhd.blob_size(size))

    def put(piece: Piece) -> None:
        offset, data = piece
        blob.upload_page(data, offset=offset, length=len(data))

    def loop() -> dict[str, Any]:
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(put, plan):
                pass
        return {"seconds": time.monotonic() - start}

    try:
        os.sync()
        return cpu.around(loop)
    finally:
        blob.delete_blob()
        service.close()


def stats(seconds: list[float], shipped: int, alloc: int) -> dict[str, Any]:
    """Median and every run, with MiB/s over the shipped and the allocated bytes."""
    med = statistics.median(seconds)
    rates = {"mib_s_shipped": bp.mibs(shipped, med), "mib_s_allocated": bp.mibs(alloc, med)}
    return {"runs": [round(s, 3) for s in seconds], "seconds": round(med, 3)} | rates


def bench(work: Path, size: int, runs: int, console: Console) -> dict[str, Any]:
    """The whole benchmark; returns every figure."""
    raw, disk = work / "master.raw", work / "src-disks" / f"{bp.VM}-vda.qcow2"
    disk.parent.mkdir(parents=True)
    console.log(f"building the {size / bp.GIB:g} GiB source disk")
    content = bp.build_disk(raw, disk, size)
    plan = pieces(raw, disk, size)
    shipped, alloc = sum(len(b) for _o, b in plan), content["allocated_bytes"]
    reports: dict[str, list[dict[str, Any]]] = {k: [] for k in VARIANTS}
    facts = bp.machine(work) | {"azurite": az_version()}
    with ExitStack() as stack:
        az = stack.enter_context(sa.azure_doubles(persist=True, base=work / "azure"))
        with blob_service(az) as service:
            service.create_container("rawceiling")
        sb = AzureStandby(work, az)
        stack.callback(sb.destroy)
        sb.setup(disk)
        steps: dict[str, Callable[[int], dict[str, Any]]] = {
            "standby_default": lambda i: sb.initial_sync("default"),
            "standby_verify_full": lambda i: sb.initial_sync("fullverify"),
            "standby_verify_none": lambda i: sb.initial_sync("noverify"),
            "raw_parallel": lambda i: raw_upload(az, plan, size, WORKERS, f"p{i}", sb.cpu),
            "raw_single": lambda i: raw_upload(az, plan, size, 1, f"s{i}", sb.cpu),
        }
        for i in range(runs):
            for key, step in steps.items():
                console.log(f"round {i + 1}/{runs}: {VARIANTS[key]}")
                reports[key].append(step(i))
    out: dict[str, Any] = {}
    for key, reps in reports.items():
        out[key] = stats([r["seconds"] for r in reps], shipped, alloc) | {"reports": reps}
        cpus = {k: statistics.median(r["cpu"][k] for r in reps) for k in reps[0]["cpu"]}
        out[key]["cpu_seconds_median"] = cpus
        if key.startswith("standby"):
            out[key]["wall"] = stats([r["wall_seconds"] for r in reps], shipped, alloc)
            bad = [r["bytes_written"] for r in reps if r["bytes_written"] != shipped]
            if bad:
                raise RuntimeError(f"standby shipped {bad}, the raw plan {shipped} bytes")
    ceiling, ratios = out["raw_parallel"]["seconds"], {}
    for key in ("standby_default", "standby_verify_full", "standby_verify_none"):
        ratios[f"{key}_cycle"] = round(ceiling / out[key]["seconds"], 3)
        ratios[f"{key}_wall"] = round(ceiling / out[key]["wall"]["seconds"], 3)
    return {
        "machine": facts,
        "disk": content | {"shipped_bytes": shipped, "upload_pieces": len(plan)},
        "workers": WORKERS,
        "results": out,
        "ratio_vs_raw_parallel": ratios,
        "target_met": ratios["standby_default_cycle"] >= 0.8,  # the default policy
        "target_met_verify_full": ratios["standby_verify_full_cycle"] >= 0.8,
        "target_met_verify_none": ratios["standby_verify_none_cycle"] >= 0.8,
    }


def az_version() -> str:
    """Azurite's version (its package.json)."""
    pkg = ROOT / "tests/doubles/azurite/node_modules/azurite/package.json"
    return str(json.loads(pkg.read_text())["version"]) if pkg.exists() else "?"


def show(r: dict[str, Any], console: Console) -> None:
    """The results table and the verdict on the target."""
    d, res, ratio = r["disk"], r["results"], r["ratio_vs_raw_parallel"]
    title = (
        f"{d['size'] / bp.GIB:g} GiB disk: {d['allocated_bytes'] / MIB:,.1f} MiB allocated, "
        f"{d['shipped_bytes'] / MIB:,.1f} MiB shipped in {d['upload_pieces']} upload_page "
        f"calls; {r['workers']} in flight; {r['machine']['nproc']} cores"
    )
    t = Table(*COLUMNS, title=title)
    for key, label in VARIANTS.items():
        cpu = " / ".join(f"{v:.1f}" for v in res[key]["cpu_seconds_median"].values())
        rows = [(label, res[key], cpu)]
        if key.startswith("standby"):
            rows = [
                (f"{label}, cycle", res[key], cpu),
                ("  same, whole command", res[key]["wall"], ""),
            ]
        for text, s, c in rows:
            x = f"{res['raw_parallel']['seconds'] / s['seconds']:.2f}"
            runs = ", ".join(f"{v:.2f}" for v in s["runs"])
            rate, alloc = str(s["mib_s_shipped"]), str(s["mib_s_allocated"])
            t.add_row(text, f"{s['seconds']:.2f}", runs, rate, alloc, x, c)
    console.print(t)
    console.print(
        f"standby (default verify = auto, cycle seconds) at {ratio['standby_default_cycle']}x the "
        f"raw ceiling ({ratio['standby_default_wall']}x by wall time; verify = full: "
        f"{ratio['standby_verify_full_cycle']}x; verify = none: "
        f"{ratio['standby_verify_none_cycle']}x); target >= 0.8x: "
        + ("met" if r["target_met"] else "MISSED")
    )


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the benchmark, write results.json, print the figures."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--size-gib", type=float, default=4.0, help="source disk size (GiB)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/standby-bench-azure"))
    p.add_argument("--runs", type=int, default=3, help="rounds of every measurement")
    p.add_argument("--keep", action="store_true", help="keep the disks and Azurite's files")
    args = p.parse_args(argv)
    size = int(args.size_gib * bp.GIB) // MIB * MIB
    work: Path = args.workdir.resolve()
    runs = max(1, args.runs)
    return bp.run_and_report(work, args.keep, 132, lambda c: bench(work, size, runs, c), show)


if __name__ == "__main__":
    sys.exit(main())
