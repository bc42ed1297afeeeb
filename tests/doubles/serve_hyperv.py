"""Run a Hyper-V host double (WinRM + Samba) until SIGINT/SIGTERM, for demos and by hand;
and act as its guests.

    python tests/doubles/serve_hyperv.py serve --dir DIR [--vms N] [--disk-mb M] [--env HV]
    python tests/doubles/serve_hyperv.py write --dir DIR VM OFFSET LENGTH --pattern 0xNN
    python tests/doubles/serve_hyperv.py check --dir DIR VM FILE [--fmt qcow2]
    python tests/doubles/serve_hyperv.py file --dir DIR VM           (the VM's live VHDX)

`serve` writes DIR/site.toml (a hyperv site file as an operator writes it: the WinRM
certificate pinned by `ca_file`, passwords as env: references), DIR/env (the variables those
references name) and DIR/ready.json, removed on exit. Guest writes go to the serving process
over a Unix socket (DIR/guest.sock) so they land in the double's RCT log.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.hyperv import HyperVLab, start_hyperv

NAMES = ["web01", "app01", "db01", "file01", "dc01", "print01"]


def _serve(args: argparse.Namespace) -> int:
    base: Path = args.dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    lab = start_hyperv(base / "host", env_prefix=f"STANDBY_{args.env}")
    sock = base / "guest.sock"
    sock.unlink(missing_ok=True)
    try:
        for name in NAMES[: args.vms]:
            lab.model.add_vm(name, [args.disk_mb])
        lab.write_site(base, "site")
        (base / "sites" / "site.toml").rename(base / "site.toml")
        (base / "sites").rmdir()
        env = [k for k in os.environ if k.startswith(f"STANDBY_{args.env}_")]
        (base / "env").write_text("".join(f"export {k}='{os.environ[k]}'\n" for k in env))
        server = _guest_server(lab, sock)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        ready = {"winrm": lab.winrm.port, "smb": lab.samba.port, "root": str(lab.model.root)}
        (base / "ready.json").write_text(json.dumps(ready))
        print(
            f"ready: Hyper-V host double, WinRM https://127.0.0.1:{lab.winrm.port}/wsman, "
            f"SMB \\\\127.0.0.1\\{lab.samba.share} on port {lab.samba.port}, "
            f"VMs {', '.join(lab.model.vms)}",
            flush=True,
        )
        stop.wait()
        server.shutdown()
    finally:
        (base / "ready.json").unlink(missing_ok=True)
        sock.unlink(missing_ok=True)
        lab.stop()
    return 0


def _guest_server(lab: HyperVLab, path: Path) -> socketserver.UnixStreamServer:
    class Guest(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            req = json.loads(self.rfile.readline())
            try:
                data = bytes([req["pattern"]]) * req["length"]
                lab.model.guest_write(req["vm"], req["disk"], req["offset"], data)
                self.wfile.write(b"ok\n")
            except Exception as exc:  # reported to the caller, the server goes on
                self.wfile.write(f"error: {exc}\n".encode())

    return socketserver.UnixStreamServer(str(path), Guest)


def _write(args: argparse.Namespace) -> int:
    req = {"vm": args.vm, "disk": args.disk, "offset": args.offset, "length": args.length,
           "pattern": int(args.pattern, 0)}  # fmt: skip
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(args.dir.resolve() / "guest.sock"))
        s.sendall(json.dumps(req).encode() + b"\n")
        answer = s.makefile().readline().strip()
    if answer != "ok":
        print(f"{args.vm}: {answer}", file=sys.stderr)
        return 1
    print(f"{args.vm}: the guest wrote {args.length} bytes of {args.pattern} at {args.offset}")
    return 0


def _vhdx(base: Path, vm: str, disk: int) -> Path:
    info = json.loads((base.resolve() / "ready.json").read_text())
    return Path(info["root"]) / vm / f"disk{disk}.vhdx"


def _check(args: argparse.Namespace) -> int:
    live = _vhdx(args.dir, args.vm, args.disk)
    proc = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "vhdx", "-F", args.fmt, str(live), str(args.file)],
        capture_output=True, text=True,
    )  # fmt: skip
    print(f"{args.vm} disk{args.disk} vs {args.file}: {proc.stdout.strip() or proc.stderr.strip()}")
    return proc.returncode


def _file(args: argparse.Namespace) -> int:
    print(_vhdx(args.dir, args.vm, args.disk))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--dir", type=Path, required=True)
    serve.add_argument("--vms", type=int, default=2)
    serve.add_argument("--disk-mb", type=int, default=64)
    serve.add_argument("--env", default="HV")
    write = sub.add_parser("write")
    write.add_argument("--dir", type=Path, required=True)
    write.add_argument("--disk", type=int, default=0)
    write.add_argument("vm")
    write.add_argument("offset", type=int)
    write.add_argument("length", type=int)
    write.add_argument("--pattern", default="0xaa")
    check = sub.add_parser("check")
    check.add_argument("--dir", type=Path, required=True)
    check.add_argument("--disk", type=int, default=0)
    check.add_argument("--fmt", default="qcow2")
    check.add_argument("vm")
    check.add_argument("file", type=Path)
    file = sub.add_parser("file")
    file.add_argument("--dir", type=Path, required=True)
    file.add_argument("--disk", type=int, default=0)
    file.add_argument("vm")
    args = parser.parse_args(argv)
    return {"serve": _serve, "write": _write, "check": _check, "file": _file}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
