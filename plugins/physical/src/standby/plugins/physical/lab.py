"""Lab helpers for the demo, tests and benchmarks: throwaway VMs in a libvirt and guest writes.

`python -m standby.plugins.physical.lab --help`. Not used by the plugin itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from standby.plugins.physical import conn as lv


def connect(uri: str) -> Any:
    """A libvirt connection (embedded roots go through an agent process)."""
    root = lv.PhysicalOptions(uri=uri).embed_root()
    if root is not None:
        lv.prepare_embed_root(root)
        from standby.plugins.physical.agent import open_embedded

        return open_embedded(uri)
    lv._start_event_loop()
    return lv.libvirt_module().open(uri)


def create_vm(
    c: Any,
    name: str,
    disk_dir: Path,
    disks: list[tuple[str, int, str]],
    *,
    domain_type: str = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu",
    memory_mib: int = 64,
    start: bool = True,
    cache: str | None = None,
    qmp_socket: Path | None = None,
) -> str:
    """Define (and start) a firmware-only VM with the given (dev, size, format) disks.

    `cache` sets the disks' cache mode; `qmp_socket` adds a QMP monitor of the lab's own, so
    that another process can make guest writes while a standby process holds the libvirt
    root (see `QmpWriter`)."""
    disk_dir.mkdir(parents=True, exist_ok=True)
    xml_disks = []
    for dev, size, fmt in disks:
        path = disk_dir / f"{name}-{dev}.{fmt}"
        if not path.exists():
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True
            )
        mode = f" cache='{cache}'" if cache else ""
        xml_disks.append(
            f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'{mode}/>"
            f"<source file='{path}'/><target dev='{dev}' bus='virtio'/></disk>"
        )
    ns, extra = "", ""
    if qmp_socket is not None:
        ns = " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"
        extra = (
            "<qemu:commandline><qemu:arg value='-qmp'/>"
            f"<qemu:arg value='unix:{qmp_socket},server=on,wait=off'/></qemu:commandline>"
        )
    xml = (
        f"<domain type='{domain_type}'{ns}><name>{name}</name>"
        f"<memory unit='MiB'>{memory_mib}</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>"
        f"<devices>{''.join(xml_disks)}"
        "<interface type='user'><mac address='52:54:00:5b:00:01'/><model type='virtio'/>"
        f"</interface><memballoon model='none'/></devices>{extra}</domain>"
    )
    dom = c.defineXML(xml)
    if start:
        dom.create()
    return str(dom.UUIDString())


def qdev_path(dom: Any, dev: str) -> str:
    """The QEMU device path qemu-io needs for a disk (by its libvirt alias)."""
    root = ET.fromstring(dom.XMLDesc(0))
    for disk in root.iter("disk"):
        target = disk.find("target")
        alias = disk.find("alias")
        if target is not None and target.get("dev") == dev and alias is not None:
            name = alias.get("name")
            bus = target.get("bus")
            if bus == "virtio":
                return f"/machine/peripheral/{name}/virtio-backend"
            return str(name)
    raise KeyError(dev)


def guest_write(c: Any, name: str, dev: str, offset: int, length: int, pattern: int) -> None:
    """Write into a running VM's disk as its guest would (QEMU's qemu-io, no guest OS)."""
    dom = c.lookupByName(name)
    cmd = f'qemu-io -d {qdev_path(dom, dev)} "write -P {pattern:#x} {offset} {length}"'
    out = lv.qemu_monitor(dom, cmd, 1)  # 1 = VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    if out.strip():
        raise RuntimeError(f"qemu-io: {out.strip()}")


def guest_flush(c: Any, name: str, dev: str) -> None:
    """Flush a running VM's disk so its image file is consistent for outside readers."""
    dom = c.lookupByName(name)
    out = lv.qemu_monitor(dom, f'qemu-io -d {qdev_path(dom, dev)} "flush"', 1)
    if out.strip():
        raise RuntimeError(f"qemu-io: {out.strip()}")


def guest_discard(c: Any, name: str, dev: str, offset: int, length: int) -> None:
    """Zero a range of a running VM's disk."""
    dom = c.lookupByName(name)
    cmd = f'qemu-io -d {qdev_path(dom, dev)} "write -z {offset} {length}"'
    out = lv.qemu_monitor(dom, cmd, 1)
    if out.strip():
        raise RuntimeError(f"qemu-io: {out.strip()}")


class QmpWriter:
    """Guest writes through a VM's extra QMP monitor (`create_vm(qmp_socket=...)`), from a
    process that does not hold the libvirt root. Writes go through QEMU's block layer like a
    guest's (qemu-io), so they land in the disks' dirty bitmaps."""

    def __init__(self, socket_path: Path) -> None:
        import json
        import socket

        self._json = json
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(socket_path))
        self.file = self.sock.makefile("rb")
        self.next_id = 0
        json.loads(self.file.readline())  # the greeting
        self.send("qmp_capabilities")
        self.reply()

    def send(self, command: str, **arguments: Any) -> int:
        """Send one command without waiting; returns its id."""
        self.next_id += 1
        msg = {"execute": command, "id": self.next_id, "arguments": arguments}
        self.sock.sendall(self._json.dumps(msg).encode() + b"\n")
        return self.next_id

    def reply(self) -> dict[str, Any]:
        """The next reply (events that QEMU sends every monitor are skipped)."""
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError("QMP monitor closed")
            msg: dict[str, Any] = self._json.loads(line)
            if "event" not in msg:
                if "error" in msg:
                    raise RuntimeError(f"QMP: {msg['error']}")
                return msg

    def qemu_io(self, device: str, command: str) -> int:
        """Queue `qemu-io -d device "command"` (HMP); check it with `io_done`."""
        line = f'qemu-io -d {device} "{command}"'
        return self.send("human-monitor-command", **{"command-line": line})

    def io_done(self) -> None:
        """Wait for one queued qemu-io command; its text output means it failed."""
        out = self.reply().get("return", "")
        if out:
            raise RuntimeError(f"qemu-io: {str(out).strip()}")

    def close(self) -> None:
        self.sock.close()


def destroy_vm(c: Any, name: str) -> None:
    """Stop and undefine a domain; a domain that is (or just went) away is fine."""
    libvirt = lv.libvirt_module()
    try:
        dom = c.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise


def images_equal(a: Path, b: Path, fmt_a: str = "qcow2", fmt_b: str = "qcow2") -> bool:
    """Whether two images hold the same guest-visible bytes (`qemu-img compare`, works on
    images in use). Differing sizes compare equal only if the tail of the larger is zero."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
        capture_output=True,
        text=True,
    )
    if proc.returncode > 1:
        raise RuntimeError(f"qemu-img compare: {proc.stderr.strip()}")
    return proc.returncode == 0


def has_pattern(path: Path, offset: int, length: int, pattern: int, fmt: str = "qcow2") -> bool:
    """Whether an image range is filled with one byte value (`qemu-io read -P`)."""
    proc = subprocess.run(
        [
            "qemu-io",
            "-U",
            "-r",
            "-f",
            fmt,
            "-c",
            f"read -P {pattern:#x} {offset} {length}",
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0 and "verification failed" not in proc.stdout + proc.stderr


def read_range(path: Path, offset: int, length: int, fmt: str = "qcow2") -> bytes:
    """Guest-visible bytes of an image range (qemu-io, works on images in use)."""
    proc = subprocess.run(
        ["qemu-io", "-U", "-r", "-f", fmt, "-c", f"read -v {offset} {length}", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    out = bytearray()
    for line in proc.stdout.splitlines():
        if ":" in line and line[:8].strip().isalnum() and len(line) > 10:
            hexpart = line.split(":", 1)[1][:49]
            out.extend(bytes.fromhex(hexpart.replace(" ", "")))
    return bytes(out[:length])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m standby.plugins.physical.lab")
    p.add_argument("--uri", help="libvirt URI (needed by create/write/destroy/list)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create")
    c.add_argument("name")
    c.add_argument("--dir", type=Path, required=True)
    c.add_argument("--disk", action="append", default=[], help="dev:size_mib[:format]")
    w = sub.add_parser("write")
    w.add_argument("name")
    w.add_argument("dev")
    w.add_argument("offset", type=int)
    w.add_argument("length", type=int)
    w.add_argument("--pattern", type=lambda x: int(x, 0), default=0xAB)
    d = sub.add_parser("destroy")
    d.add_argument("names", nargs="+")
    sub.add_parser("list")
    dk = sub.add_parser("disk", help="the file behind one disk of a domain")
    dk.add_argument("name")
    dk.add_argument("dev")
    v = sub.add_parser("verify", help="check OFFSET:LENGTH:PATTERN ranges of an image")
    v.add_argument("image", type=Path)
    v.add_argument("expect", nargs="+")
    cmp = sub.add_parser("compare", help="guest-visible contents of two images are equal")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "verify":
        for spec in args.expect:
            off, length, pattern = (int(x, 0) for x in spec.split(":"))
            if not has_pattern(args.image, off, length, pattern):
                print(f"MISMATCH {args.image} at {off}+{length} (expected {pattern:#x})")
                return 1
            print(f"ok {args.image.name} {off}+{length} = {pattern:#x}")
        return 0
    if args.cmd == "compare":
        same = images_equal(args.a, args.b)
        print("same" if same else "DIFFERENT")
        return 0 if same else 1
    if not args.uri:
        p.error("--uri is required for this command")
    conn = connect(args.uri)
    try:
        if args.cmd == "create":
            disks = []
            for spec in args.disk or ["vda:256"]:
                parts = spec.split(":")
                disks.append(
                    (parts[0], int(parts[1]) << 20, parts[2] if len(parts) > 2 else "qcow2")
                )
            print(create_vm(conn, args.name, args.dir, disks))
        elif args.cmd == "write":
            guest_write(conn, args.name, args.dev, args.offset, args.length, args.pattern)
        elif args.cmd == "disk":
            from standby.plugins.physical.domxml import disk_sources

            xml = conn.lookupByName(args.name).XMLDesc(0)
            print(disk_sources(xml)[args.dev]["file"])
        elif args.cmd == "list":
            for dom in conn.listAllDomains():
                print(dom.name(), "running" if dom.isActive() else "shut off")
        else:
            for n in args.names:
                destroy_vm(conn, n)
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
