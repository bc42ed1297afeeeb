"""Run a vcsim double until SIGINT/SIGTERM, for demos and by hand; and act as its guests.

    python tests/doubles/serve_vcsim.py serve --dir DIR [--vms N] [--disk-mb M] [--dr]
    python tests/doubles/serve_vcsim.py write --dir DIR VM OFFSET LENGTH --pattern 0xNN
    python tests/doubles/serve_vcsim.py check --dir DIR VM FILE   (VM's disk == raw FILE?)
    python tests/doubles/serve_vcsim.py file --dir DIR VM         (the VM's disk file)

`serve` writes DIR/site.toml (a vmware site file as an operator writes it: TLS pinned by
thumbprint, the password as an env: reference; with --dr also the datastore keys a DR site
needs), DIR/env (the variable the reference names) and DIR/ready.json, removed on exit.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from doubles.vcsim_proc import Vcsim, start_vcsim


def _serve(args: argparse.Namespace) -> int:
    base: Path = args.dir.resolve()
    stopping: list[int] = []  # a signal handler may only append here: it can run at any
    # point of the main thread, even inside a lock another handler call holds
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    sim = start_vcsim(base, vms=args.vms, disk_mb=args.disk_mb)
    try:
        env = f"STANDBY_{args.env}_PASSWORD"
        lines = [
            'plugin = "vmware"',
            f'host = "{sim.host}"',
            f"port = {sim.port}",
            f'user = "{sim.user}"',
            f'password = "env:{env}"',
            f'datacenter = "{sim.datacenter}"',
            f'thumbprint = "{sim.thumbprint}"',
        ]
        if args.dr:
            lines += [f'datastore = "{sim.datastore}"', f'datastore_path = "{sim.datastore_dir}"']
        lines += args.extra or []
        (base / "site.toml").write_text("\n".join(lines) + "\n")
        (base / "env").write_text(f"export {env}='{sim.password}'\n")
        ready = {"host": sim.host, "port": sim.port, "cert": str(sim.cert),
                 "datastore_dir": str(sim.datastore_dir), "pid": sim.proc.pid}  # fmt: skip
        (base / "ready.json").write_text(json.dumps(ready))
        print(f"ready: vCenter double at https://{sim.host}:{sim.port}/sdk", flush=True)
        while not stopping:
            time.sleep(0.2)
    finally:
        (base / "ready.json").unlink(missing_ok=True)
        sim.stop()
    return 0


def _sim(base: Path) -> Vcsim:
    info = json.loads((base.resolve() / "ready.json").read_text())
    return Vcsim(url="", host=info["host"], port=info["port"], cert=Path(info["cert"]),
                 thumbprint="", user="", password="", datacenter="", datastore="",
                 dir=base, proc=None)  # type: ignore[arg-type]  # fmt: skip


def _write(args: argparse.Namespace) -> int:
    data = bytes([int(args.pattern, 0)]) * args.length
    _sim(args.dir).write(args.vm, args.disk, args.offset, data)
    print(f"{args.vm}: the guest wrote {args.length} bytes of {args.pattern} at {args.offset}")
    return 0


def _check(args: argparse.Namespace) -> int:
    disk = next(d for d in _sim(args.dir).disks(args.vm) if d["deviceKey"] == args.disk)
    proc = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "raw", "-F", args.fmt, disk["file"], str(args.file)],
        capture_output=True, text=True,
    )  # fmt: skip
    print(f"{args.vm} disk{args.disk} vs {args.file}: {proc.stdout.strip() or proc.stderr.strip()}")
    return proc.returncode


def _file(args: argparse.Namespace) -> int:
    disk = next(d for d in _sim(args.dir).disks(args.vm) if d["deviceKey"] == args.disk)
    print(disk["file"])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--dir", type=Path, required=True)
    serve.add_argument("--vms", type=int, default=2)
    serve.add_argument("--disk-mb", type=int, default=64)
    serve.add_argument("--dr", action="store_true")
    serve.add_argument("--env", default="VC")
    serve.add_argument("--extra", action="append", help="another line for site.toml")
    write = sub.add_parser("write")
    write.add_argument("--dir", type=Path, required=True)
    write.add_argument("--disk", type=int, default=2000)
    write.add_argument("vm")
    write.add_argument("offset", type=int)
    write.add_argument("length", type=int)
    write.add_argument("--pattern", default="0xaa")
    check = sub.add_parser("check")
    check.add_argument("--dir", type=Path, required=True)
    check.add_argument("--disk", type=int, default=2000)
    check.add_argument("--fmt", default="raw")
    check.add_argument("vm")
    check.add_argument("file", type=Path)
    file = sub.add_parser("file")
    file.add_argument("--dir", type=Path, required=True)
    file.add_argument("--disk", type=int, default=2000)
    file.add_argument("vm")
    args = parser.parse_args(argv)
    return {"serve": _serve, "write": _write, "check": _check, "file": _file}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
