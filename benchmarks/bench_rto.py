"""Benchmark of a recovery plan's RTO on the physical target: 10 VMs in 3 groups.

Builds 10 small VMs in an embedded libvirt root (db1 is the tiny Linux guest of the end-to-end
tests, the others firmware-only lab VMs), protects and replicates them to a second root, then
times `standby drill` (--runs times) and, last, `standby plan failover --unplanned` on the same
plan; `--planned` is timed on a fresh copy of the lab. See benchmarks/README.md for the method.

    uv run python benchmarks/bench_rto.py [--workdir DIR] [--runs 3] [--keep]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import bench_physical as bp  # the shared benchmark frame (run_and_report)
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
GROUPS = {"database": ["db1", "db2", "db3"], "app": ["app1", "app2", "app3", "app4"]}
GROUPS["web"] = ["web1", "web2", "web3"]
GUEST = "db1"
TARGET = 60.0
COLUMNS = {
    "wall s": "wall_seconds",
    "cmd → run start": "command_to_run_start",
    "all running (cmd)": "all_running_from_command",
    "db1 healthy (cmd)": "guest_healthy_from_command",
    "report RTO": "report_rto_seconds",
    "drill cleanup s": "cleanup_seconds",
}
GUEST_SETUP = "(mkfs.ext2 -q /dev/vda || mke2fs /dev/vda) && mount /dev/vda /mnt && dd bs=1M "
GUEST_SETUP += (
    "count=16 if=/dev/urandom of=/mnt/data.bin && md5sum /mnt/data.bin > /mnt/data.md5 && sync"
)
GUEST_CHECK = "grep -q ' /mnt ' /proc/mounts || mount -o ro /dev/vda /mnt; md5sum -c /mnt/data.md5"


def guest_support() -> ModuleType:
    """tests/support/guest.py: builds the tiny guest and talks to its serial console."""
    sys.path.insert(0, str(REPO / "tests"))
    return importlib.import_module("support.guest")


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Run a command, fail loudly, return its stdout."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def qemu_pids(marker: str, name: str | None = None) -> list[int]:
    """QEMU processes whose command line holds `marker` (and `-name guest=NAME,`)."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd and marker in cmd and (not name or f"guest={name}," in cmd):
            pids.append(int(p.name))
    return pids


def probe(dr_root: str, console_prefix: str) -> int:
    """The plan's health check (one VM, from the runner's environment): its QEMU process runs
    in the DR root; for the guest also its OS answers on the console and its data checks out."""
    vm, test = os.environ["STANDBY_VM"], os.environ["STANDBY_KIND"] in ("test", "drill")
    name = f"{vm}-test" if test else vm
    if not qemu_pids(dr_root, name):
        print(f"no QEMU process for {name} in {dr_root}")
        return 1
    if vm == GUEST:
        sock = Path(f"{console_prefix}.sock" if test else f"{console_prefix}-{vm}.sock")
        with guest_support().GuestConsole(sock, timeout=170) as console:
            print(console.run(GUEST_CHECK).strip())
    return 0


class Lab:
    """The standby CLI with its own STANDBY_HOME over two embedded libvirt roots."""

    def __init__(self, base: Path, domain_type: str) -> None:
        self.base, self.domain_type = base, domain_type
        self.src_uri, self.dr_root = f"qemu:///embed?root={base / 'src'}", base / "dr"
        self.dr_uri, self.plan = f"qemu:///embed?root={self.dr_root}", base / "plan.toml"
        self.env = os.environ | {"STANDBY_HOME": str(base / "home")}
        exe = Path(sys.executable).with_name("standby")
        self.exe = str(exe) if exe.exists() else shutil.which("standby") or "standby"

    def __call__(self, *args: str) -> str:
        return run([self.exe, *args], self.env)

    def build(self) -> dict[str, Any]:
        """VMs with data at the source, sites, a policy, protections, one replication."""
        from standby.plugins.physical import lab

        gs, disks_dir = guest_support(), self.base / "disks"
        image = gs.build_guest(REPO / ".cache" / "guest")
        conn, facts = lab.connect(self.src_uri), {}
        try:
            for vms in GROUPS.values():
                for i, vm in enumerate(vms):
                    if vm == GUEST:
                        continue
                    disks = [("vda", (256 if vm.startswith("db") else 128) * MIB, "qcow2")]
                    disks += [("vdb", 64 * MIB, "qcow2")] if i % 2 == 0 else []
                    lab.create_vm(conn, vm, disks_dir, disks)
                    for dev, size, _ in disks:
                        for k in range(4):  # 4 MiB of data per disk, spread out
                            lab.guest_write(conn, vm, dev, k * size // 4, MIB, 0x11 + k)
                    facts[vm] = {d: s // MIB for d, s, _ in disks}
            disk = disks_dir / f"{GUEST}-vda.qcow2"
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(128 * MIB)])
            xml = gs.guest_domain_xml(GUEST, image, disk, self.base / "g.sock")
            conn.defineXML(xml).create()  # TCG: this kernel does not boot under nested KVM
            with gs.GuestConsole(self.base / "g.sock") as guest:
                guest.run(GUEST_SETUP)
            facts[GUEST] = {"vda": 128}
        finally:
            conn.close()  # the CLI opens this embedded root next: one process at a time
        self("sites", "add", "src", "--plugin", "physical", "--set", f'uri="{self.src_uri}"')
        dr = [f'uri="{self.dr_uri}"', f'pool_dir="{self.base / "pool"}"']
        dr += [f'domain_type="{self.domain_type}"']
        self("sites", "add", "dr", "--plugin", "physical", *(a for d in dr for a in ("--set", d)))
        (pol := self.base / "home" / "policies").mkdir(parents=True, exist_ok=True)
        (pol / "fast.toml").write_text('rpo = "1h"\nretain = 3\nshutdown_timeout = "1s"\n')
        pids = {}
        for vm in (v for vms in GROUPS.values() for v in vms):
            out = self("protect", vm, "--from", "src", "--to", "dr", "--policy", "fast", "--json")
            pids[vm] = json.loads(out)["protection"]
        t0 = time.monotonic()
        self("replicate", "--json")
        check = f"{sys.executable} {Path(__file__).resolve()} --probe {self.dr_root} "
        check += str(self.dr_root / "standby-work" / f"console-{pids[GUEST]}")
        plan = 'name = "rto"\ndescription = "database, then app, then web"\n'
        for group, vms in GROUPS.items():
            plan += f'\n[[groups]]\nname = "{group}"\nvms = {json.dumps(vms)}\n'
            plan += f'  [[groups.after]]\n  type = "wait"\n  command = "{check}"\n'
            plan += '  timeout = "3m"\n  interval = 0.5\n'
        self.plan.write_text(plan)
        self("plan", "check", str(self.plan))
        return {"disks_mib": facts, "replicate_seconds": round(time.monotonic() - t0, 2)}

    def timed(self, *args: str) -> dict[str, Any]:
        """Run one plan command; its run analysed from `standby plan show RUN --json`."""
        os.sync()
        t_cmd, t0 = datetime.now(UTC), time.monotonic()
        out = json.loads(self(*args, "--json"))
        wall = time.monotonic() - t0
        rid = out.get("run") or out["run_id"]
        return analyse(json.loads(self("plan", "show", str(rid), "--json")), out, wall, t_cmd)

    def destroy(self) -> None:
        """Destroy every domain of both roots, then kill any QEMU process left in them."""
        from standby.plugins.physical import lab

        for uri in (self.src_uri, self.dr_uri):
            try:
                conn = lab.connect(uri)
                try:
                    for dom in conn.listAllDomains():
                        lab.destroy_vm(conn, dom.name())
                finally:
                    conn.close()
            except Exception as exc:  # the kill below is the fallback
                print(f"cleanup of {uri}: {exc}", file=sys.stderr)
        for pid in qemu_pids(str(self.base)):
            os.kill(pid, signal.SIGKILL)


def analyse(
    view: dict[str, Any], out: dict[str, Any], wall: float, t_cmd: datetime
) -> dict[str, Any]:
    """Times of one run from its recorded steps, in seconds from the run's start."""
    start, steps = datetime.fromisoformat(view["started_at"]), view["steps"]

    def at(stamp: str) -> float:
        return round((datetime.fromisoformat(stamp) - start).total_seconds(), 2)

    lag = round((start - t_cmd).total_seconds(), 2)
    fos = [s for s in steps if s["kind"] == "failover"]
    waits = [s for s in steps if s["kind"] == "wait"]
    cleans = [s for s in steps if s["kind"] == "cleanup"]
    ends = [at(s["finished_at"]) for s in cleans]
    running = max(at(s["result"]["running_at"]) for s in fos)
    guest = next(at(s["finished_at"]) for s in waits if s["vm"] == GUEST)
    groups = {}
    for g in GROUPS:
        mine = [s for s in fos + waits if s["group"] == g]
        fo = [s["duration_seconds"] for s in fos if s["group"] == g]
        groups[g] = {
            "from": min(at(s["started_at"]) for s in mine),
            "to": max(at(s["finished_at"]) for s in mine),
            "failover_seconds": {"min": min(fo), "median": statistics.median(fo), "max": max(fo)},
            "check_seconds": max(s["duration_seconds"] for s in waits if s["group"] == g),
        }
    return {
        "run": view["id"],
        "kind": view["kind"],
        "state": view["state"],
        "wall_seconds": round(wall, 2),
        "command_to_run_start": lag,
        "run_seconds": view["duration_seconds"],
        "all_running_from_run_start": running,
        "all_running_from_command": round(running + lag, 2),
        "guest_healthy_from_command": round(guest + lag, 2),
        "report_rto_seconds": out.get("rto_seconds"),
        "cleanup_seconds": round(max(ends) - at(cleans[0]["started_at"]), 2) if ends else None,
        "groups": groups,
        "failover_step_seconds": {s["vm"]: s["duration_seconds"] for s in fos},
    }


def machine(work: Path, domain_type: str) -> dict[str, Any]:
    """Facts about this machine and the tools' versions."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / (1 << 30), 1),
        "loadavg": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": run(["qemu-system-x86_64", "--version"]).splitlines()[0],
        "libvirt": run(["virsh", "--version"]).strip(),
        "dr_domain_type": domain_type,
        "other_qemu_processes_at_start": len(qemu_pids("")),
        "workdir_fs": run(["stat", "-f", "-c", "%T", str(work)]).strip(),
    }


def bench(work: Path, runs: int, planned: bool, dtype: str, console: Console) -> dict[str, Any]:
    """The whole benchmark; returns every figure."""
    results: dict[str, Any] = {"machine": machine(work, dtype), "target_seconds": TARGET}
    labs = (("a", ["drill"] * runs + ["--unplanned"]), ("b", ["--planned"]))
    for name, kinds in labs[: 2 if planned else 1]:
        lab = Lab(work / name, dtype)
        try:
            console.log(f"lab {name}: building 10 VMs, protecting and replicating them src -> dr")
            results[f"setup_{name}"] = lab.build()
            for i, kind in enumerate(kinds):  # the real failover last: the VMs stay failed over
                console.log(f"lab {name}: {kind} {i + 1}/{len(kinds)}")
                args = [kind] if kind == "drill" else ["plan", "failover", kind]
                figures = lab.timed(*args, str(lab.plan))
                if kind == "drill":
                    results.setdefault("drills", []).append(figures)
                else:
                    results[kind[2:]] = figures
        finally:
            lab.destroy()
    med = {k: statistics.median(d[k] for d in results["drills"]) for k in COLUMNS.values()}
    results["drill_median"] = med
    cmd = [k for k in COLUMNS.values() if k.endswith("_from_command")]
    results["target_met"] = max(d[k] for d in (med, results["unplanned"]) for k in cmd) <= TARGET
    if planned:  # a migration (shutdown and final sync of every VM), not a disaster's RTO
        results["planned_within_target"] = max(results["planned"][k] for k in cmd) <= TARGET
    return results


def show(r: dict[str, Any], console: Console) -> None:
    """The figures table and the per-group breakdown."""
    t = Table("run", *COLUMNS, title=f"RTO, 10 VMs in 3 groups (target <= {TARGET:g} s)")
    b = Table("run", "group", "span from run start", "failover steps s min/med/max", "check s")
    rows = [(f"drill {i + 1}", d) for i, d in enumerate(r["drills"])]
    for label, d in [*rows, *((k, r[k]) for k in ("unplanned", "planned") if k in r)]:
        t.add_row(label, *("" if d[k] is None else f"{d[k]:.2f}" for k in COLUMNS.values()))
        for g, x in d["groups"].items():
            fo = " / ".join(f"{v:.2f}" for v in x["failover_seconds"].values())
            span = f"{x['from']:.2f} - {x['to']:.2f}"
            b.add_row(label, g, span, fo, f"{x['check_seconds']:.2f}")
    console.print(t, b)
    console.print(f"drill medians: {r['drill_median']}")
    console.print(
        f"target met (drills, unplanned): {r['target_met']}; planned failover within "
        f"it: {r.get('planned_within_target', 'not run')}"
    )


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the benchmark, write results.json, print the figures."""
    if argv is None and sys.argv[1:2] == ["--probe"]:
        return probe(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/standby-rto"))
    p.add_argument("--runs", type=int, default=3, help="drills to run (the median counts)")
    p.add_argument("--no-planned", action="store_true", help="skip the planned failover")
    p.add_argument("--domain-type", choices=("kvm", "qemu"), default="qemu", help="at DR")
    p.add_argument("--keep", action="store_true", help="keep the roots, disks and state")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    work: Path = args.workdir.resolve()
    return bp.run_and_report(
        work,
        args.keep,
        120,
        lambda c: bench(work, args.runs, not args.no_planned, args.domain_type, c),
        show,
    )


if __name__ == "__main__":
    sys.exit(main())
