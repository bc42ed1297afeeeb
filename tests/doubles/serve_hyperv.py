"""Run Hyper-V host doubles (WinRM + Samba) and a VMM double over them until SIGINT/SIGTERM,
for demos and by hand; and act as their guests.

    python tests/doubles/serve_hyperv.py serve --dir DIR [--vms N] [--disk-mb M] [--env HV]
    python tests/doubles/serve_hyperv.py write --dir DIR [--host H] VM OFFSET LENGTH --pattern 0xNN
    python tests/doubles/serve_hyperv.py check --dir DIR VM FILE [--fmt qcow2]
    python tests/doubles/serve_hyperv.py same --dir DIR VM HOST_A HOST_B  (the VM's disks alike?)
    python tests/doubles/serve_hyperv.py file --dir DIR VM           (the VM's live VHDX)

Two hosts: `hv-a.corp` (the VMs; from the third one on, each with a NIC) and `hv-b.corp`
(none), and one VMM server managing both: cloud `Gold` (hv-a, VM network `Prod`) and cloud
`DR` (hv-b, VM network `DR-Prod`). `serve` writes DIR/site.toml (hv-a as a hyperv site file,
as an operator writes it: the WinRM certificate pinned by `ca_file`, passwords as env:
references), DIR/vmm-prod.toml and DIR/vmm-dr.toml (the two clouds as vmm sites), DIR/env
(the variables those references name) and DIR/ready.json, removed on exit. Guest writes and
comparisons go to the serving process over a Unix socket (DIR/guest.sock), so writes land in
the double's RCT log.
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from doubles.hyperv_host import Nic
from doubles.vmm import Cloud
from support.hyperv import HyperVLab, start_hyperv, start_vmm

NAMES = ["web01", "app01", "db01", "file01", "dc01", "print01"]


def _serve(args: argparse.Namespace) -> int:
    base: Path = args.dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    stopping: list[int] = []  # a signal handler may only append here: it can run at any
    # point of the main thread, even inside a lock another handler call holds
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    lab = start_hyperv(base / "host", env_prefix=f"STANDBY_{args.env}")
    drlab = start_hyperv(base / "drhost", env_prefix=f"STANDBY_{args.env}DR")
    clouds = {"Gold": Cloud(["hv-a.corp"], ["Prod"]), "DR": Cloud(["hv-b.corp"], ["DR-Prod"])}
    vmm = start_vmm(base / "vmm", {"hv-a.corp": lab, "hv-b.corp": drlab}, clouds)
    sock = base / "guest.sock"
    sock.unlink(missing_ok=True)
    try:
        for i, name in enumerate(NAMES[: args.vms]):
            vm = lab.model.add_vm(name, [args.disk_mb])
            if i >= 2:  # the third VM on: one NIC, on switch LAN / VM network Prod
                vm.nics.append(Nic("nic0", f"00155D0A0B{i + 1:02X}", "LAN"))
                vmm.model.nic_network[(vm.id, vmm.model.mac(vm.nics[0].mac))] = "Prod"
        lab.write_site(base, "site")
        vmm.write_site(base, "vmm-prod", "Gold", switch="LAN", networks={"DR-Prod": "Prod"})
        vmm.write_site(base, "vmm-dr", "DR", switch="LAN", networks={"Prod": "DR-Prod"})
        for name in ("site", "vmm-prod", "vmm-dr"):
            (base / "sites" / f"{name}.toml").rename(base / f"{name}.toml")
        (base / "sites").rmdir()
        env = [k for k in os.environ if k.startswith("STANDBY_")]
        (base / "env").write_text("".join(f"export {k}='{os.environ[k]}'\n" for k in env))
        hosts = {"hv-a.corp": lab, "hv-b.corp": drlab}
        server = _guest_server(hosts, sock)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        ready = {"winrm": lab.winrm.port, "smb": lab.samba.port, "root": str(lab.model.root)}
        (base / "ready.json").write_text(json.dumps(ready))
        print(
            f"ready: Hyper-V host double, WinRM https://127.0.0.1:{lab.winrm.port}/wsman, "
            f"SMB \\\\127.0.0.1\\{lab.samba.share} on port {lab.samba.port}, "
            f"VMs {', '.join(lab.model.vms)}",
            flush=True,
        )
        while not stopping:
            time.sleep(0.2)
        server.shutdown()
    finally:
        (base / "ready.json").unlink(missing_ok=True)
        sock.unlink(missing_ok=True)
        vmm.stop()
        drlab.stop()
        lab.stop()
    return 0


def _same(hosts: dict[str, HyperVLab], vm: str, a: str, b: str) -> str:
    """Whether VM `vm` on host `a` and on host `b` hold the same bytes, disk by disk (each
    read through its differencing chain)."""
    la, lb = hosts[a], hosts[b]
    for da, db in zip(la.model.vms[vm].disks, lb.model.vms[vm].disks, strict=True):
        if la.chain_bytes(la.model.winpath(da.path)) != lb.chain_bytes(lb.model.winpath(db.path)):
            return f"{vm} disk {da.name}: differs between {a} and {b}"
    return f"{vm} on {a} and on {b}: the disks are identical"


def _guest_server(hosts: dict[str, HyperVLab], path: Path) -> socketserver.UnixStreamServer:
    class Guest(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            req = json.loads(self.rfile.readline())
            try:
                if req.get("op") == "same":
                    self.wfile.write(_same(hosts, req["vm"], req["a"], req["b"]).encode() + b"\n")
                    return
                data = bytes([req["pattern"]]) * req["length"]
                model = hosts[req.get("host") or "hv-a.corp"].model
                model.guest_write(req["vm"], req["disk"], req["offset"], data)
                self.wfile.write(b"ok\n")
            except Exception as exc:  # reported to the caller, the server goes on
                self.wfile.write(f"error: {exc}\n".encode())

    return socketserver.UnixStreamServer(str(path), Guest)


def _ask(base: Path, req: dict[str, object]) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(base.resolve() / "guest.sock"))
        s.sendall(json.dumps(req).encode() + b"\n")
        return s.makefile().readline().strip()


def _same_cmd(args: argparse.Namespace) -> int:
    answer = _ask(args.dir, {"op": "same", "vm": args.vm, "a": args.a, "b": args.b})
    print(answer)
    return 0 if answer.endswith("identical") else 1


def _write(args: argparse.Namespace) -> int:
    req = {"vm": args.vm, "disk": args.disk, "offset": args.offset, "length": args.length,
           "pattern": int(args.pattern, 0), "host": args.host}  # fmt: skip
    answer = _ask(args.dir, req)
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
    write.add_argument("--host", default="hv-a.corp")
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
    same = sub.add_parser("same")
    same.add_argument("--dir", type=Path, required=True)
    same.add_argument("vm")
    same.add_argument("a")
    same.add_argument("b")
    file = sub.add_parser("file")
    file.add_argument("--dir", type=Path, required=True)
    file.add_argument("--disk", type=int, default=0)
    file.add_argument("vm")
    args = parser.parse_args(argv)
    cmds = {"serve": _serve, "write": _write, "check": _check, "same": _same_cmd, "file": _file}
    return cmds[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
