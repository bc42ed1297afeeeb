"""Tiny bootable Linux guest (Debian cloud kernel + busybox initramfs) for end-to-end tests.

The initramfs /init loads the virtio modules and runs an agent on ttyS0 that executes
base64-framed scripts, each in a fresh ``sh`` (cwd ``/``); kernel state (mounts) persists.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import lzma
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
WANTED_MODULES = ("virtio_pci", "virtio_blk", "ext4")  # plus dependencies; built-ins skipped
READY_MARKER = "STANDBY-GUEST-READY-5f0c2a"
CMDLINE = "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off"

_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs devtmpfs /dev
echo 1 > /proc/sys/kernel/printk
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 30 ]; do sleep 0.1; i=$((i + 1)); done
exec sh /bin/agent </dev/ttyS0 >/dev/ttyS0 2>&1
"""
# Reads "BEGIN", base64 lines, "RUN <nonce>"; prints __OUT_n__ stdout __ERR_n__ stderr __END_n_rc__
_AGENT = f"""stty -echo -onlcr
echo {READY_MARKER}
while read -r line; do
  case "$line" in
    BEGIN) : > /tmp/cmd.b64 ;;
    RUN\\ *)
      n=${{line#RUN }}
      echo "__OUT_${{n}}__"
      if base64 -d /tmp/cmd.b64 >/tmp/cmd.sh 2>/tmp/cmd.err; then
        sh /tmp/cmd.sh </dev/null 2>/tmp/cmd.err; rc=$?
      else rc=254; fi
      printf '\\n__ERR_%s__\\n' "$n"; cat /tmp/cmd.err
      printf '\\n__END_%s_%s__\\n' "$n" "$rc" ;;
    *) printf '%s\\n' "$line" >> /tmp/cmd.b64 ;;
  esac
done
"""
_MKFS_EXT2 = b'#!/bin/sh\nexec mke2fs "$@"\n'  # busybox has mke2fs (ext2) but no mkfs.ext2
_VERSION = hashlib.sha1(repr((_INIT, _AGENT, WANTED_MODULES, _MKFS_EXT2)).encode()).hexdigest()[:12]

_UNPACK: dict[str, Callable[[bytes], bytes]] = {".ko": bytes, ".xz": lzma.decompress}
_DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name><memory unit='MiB'>{memory}</memory><vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type={disk_format}/><source file={disk}/><target dev='vda' bus='virtio'/>
    </disk>
    <serial type='unix'><source mode='bind' path={socket}/><target port='0'/></serial>
    <controller type='usb' model='none'/><memballoon model='none'/>
  </devices>
</domain>
"""


@dataclass(frozen=True)
class GuestImage:
    """Kernel, initramfs and command line for a direct-kernel-boot guest."""

    kernel: Path
    initrd: Path
    cmdline: str


def build_guest(cache_dir: Path) -> GuestImage:
    """Build kernel+initramfs under cache_dir once; later calls reuse the files."""
    cache_dir = cache_dir.absolute()
    final = cache_dir / f"guest-{_VERSION}"
    image = GuestImage(final / "vmlinuz", final / "initrd.gz", CMDLINE)
    if image.kernel.is_file() and image.initrd.is_file():
        return image
    (debs := cache_dir / "debs").mkdir(parents=True, exist_ok=True)
    deps = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    found = re.search(r"Depends:\s*(linux-image-\S+)", deps)
    if found is None:
        raise RuntimeError(f"cannot resolve {KERNEL_META_PACKAGE} (run 'apt-get update'?)")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp_name:
        root, out = Path(tmp_name) / "root", Path(tmp_name) / "out"
        for pkg in (found.group(1), BUSYBOX_PACKAGE):
            _run(["dpkg-deb", "-x", str(_download(pkg, debs)), str(root)])
        vmlinuz = sorted(root.glob("boot/vmlinuz-*"))
        moddirs = [*root.glob("lib/modules/*"), *root.glob("usr/lib/modules/*")]
        if not vmlinuz or not moddirs or not (root / "bin/busybox").is_file():
            raise RuntimeError(f"unexpected layout in {found.group(1)}/{BUSYBOX_PACKAGE}")
        out.mkdir()
        shutil.copyfile(vmlinuz[0], out / "vmlinuz")
        (out / "initrd.gz").write_bytes(_initramfs(moddirs[0], root / "bin/busybox"))
        try:
            out.rename(final)
        except OSError:  # a concurrent build won the race
            if not image.initrd.is_file():
                raise
    return image


def _run(argv: list[str], cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise RuntimeError(f"build_guest needs {argv[0]!r} (Debian's apt/dpkg) on PATH")
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _download(package: str, debs: Path) -> Path:
    if not (existing := sorted(debs.glob(f"{package}_*.deb"))):
        _run(["apt-get", "download", package], cwd=debs)
        if not (existing := sorted(debs.glob(f"{package}_*.deb"))):
            raise RuntimeError(f"apt-get download {package} produced no .deb in {debs}")
    return existing[-1]


def _module_order(moddir: Path) -> list[tuple[str, bytes]]:
    """Resolve WANTED_MODULES and their dependencies into (name, .ko bytes) in load order."""

    def key(path: str) -> str:
        return Path(path).name.split(".ko")[0].replace("-", "_")

    files = {key(str(p)): p for p in moddir.rglob("*.ko*")}
    builtin_file = moddir / "modules.builtin"
    builtin = {key(p) for p in builtin_file.read_text().split()} if builtin_file.exists() else set()
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or (name in builtin and name not in files):
            return
        seen.add(name)
        if (path := files.get(name)) is None:
            raise RuntimeError(f"kernel module {name!r} neither built in nor in {moddir}")
        if (unpack := _UNPACK.get(path.suffix)) is None:
            raise RuntimeError(f"unsupported kernel module compression: {path.name}")
        data = unpack(path.read_bytes())
        deps = re.search(rb"\x00depends=([^\x00]*)\x00", data)
        for dep in filter(None, deps.group(1).decode().split(",") if deps else []):
            visit(key(dep))
        order.append((name, data))

    for wanted in WANTED_MODULES:
        visit(wanted)
    return order


def _initramfs(moddir: Path, busybox: Path) -> bytes:
    """Return a gzip'd newc cpio archive with busybox, /init, the agent and the modules."""
    modules = _module_order(moddir)
    dirs = ("bin", "dev", "lib", "lib/modules", "mnt", "proc", "sys", "tmp")
    entries = [(d, stat.S_IFDIR | 0o755, b"", 0) for d in dirs] + [
        ("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)),
        ("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes(), 0),
        ("bin/sh", stat.S_IFLNK | 0o777, b"busybox", 0),
        ("init", stat.S_IFREG | 0o755, _INIT.encode(), 0),
        ("bin/agent", stat.S_IFREG | 0o644, _AGENT.encode(), 0),
        ("bin/mkfs.ext2", stat.S_IFREG | 0o755, _MKFS_EXT2, 0),
        ("lib/modules/order", stat.S_IFREG | 0o644, " ".join(n for n, _ in modules).encode(), 0),
    ]
    entries += [(f"lib/modules/{n}.ko", stat.S_IFREG | 0o644, d, 0) for n, d in modules]
    blob = bytearray()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
        raw = name.encode() + b"\x00"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev))
        blob += b"070701" + b"".join(b"%08x" % f for f in (*fields, len(raw), 0)) + raw
        blob += b"\x00" * (-len(blob) % 4) + data + b"\x00" * (-len(data) % 4)
    return gzip.compress(bytes(blob), compresslevel=6, mtime=0)


def guest_domain_xml(
    name: str,
    image: GuestImage,
    disk_path: Path,
    console_socket: Path,
    disk_format: str = "qcow2",
    memory_mib: int = 256,
) -> str:
    """Return libvirt XML for a TCG guest with one virtio disk and a unix-socket console."""
    return _DOMAIN_XML.format(
        name=escape(name),
        memory=int(memory_mib),
        kernel=escape(str(image.kernel.absolute())),
        initrd=escape(str(image.initrd.absolute())),
        cmdline=escape(image.cmdline),
        disk_format=quoteattr(disk_format),
        disk=quoteattr(str(disk_path.absolute())),
        socket=quoteattr(str(console_socket.absolute())),
    )


class GuestConsole:
    """Talks to the guest's busybox agent over the serial unix socket."""

    def __init__(self, socket_path: Path, timeout: float = 120.0) -> None:
        """Connect (retrying until the socket exists) and wait until the agent answers."""
        deadline = time.monotonic() + timeout
        self._buf = b""
        self.transcript = b""  # last 64 KiB of raw console output, for diagnostics
        while True:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._sock.connect(str(socket_path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                self._sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"console socket {socket_path} not available") from exc
                time.sleep(0.05)
        nonce = secrets.token_hex(8)
        try:  # probe until answered: output from before we connected is lost
            while True:
                self._send("", nonce)
                if self._wait(nonce, min(deadline, time.monotonic() + 3), True) is not None:
                    break
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"guest not ready after {timeout}s: {self._tail()}")
        except BaseException:
            self.close()
            raise

    def run(self, command: str, timeout: float = 60.0, check: bool = True) -> str:
        """Run command in the guest and return its stdout; RuntimeError on timeout/failure."""
        nonce = secrets.token_hex(8)
        self._send(command, nonce)
        if (result := self._wait(nonce, time.monotonic() + timeout)) is None:
            raise RuntimeError(f"timeout after {timeout}s running {command!r}: {self._tail()}")
        rc, out, err = result
        if check and rc != 0:
            raise RuntimeError(f"{command!r} exited {rc}\nstdout: {out}\nstderr: {err}")
        return out

    def close(self) -> None:
        """Close the console connection (the guest keeps running)."""
        self._sock.close()

    def __enter__(self) -> GuestConsole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, command: str, nonce: str) -> None:
        encoded = base64.encodebytes(command.encode()).decode()
        self._sock.sendall(f"\nBEGIN\n{encoded}RUN {nonce}\n".encode())

    def _wait(self, nonce: str, until: float, probing: bool = False) -> tuple[int, str, str] | None:
        n, marker = nonce.encode(), READY_MARKER.encode()
        pattern = rb"__OUT_%s__\n(.*?)\n__ERR_%s__\n(.*?)\n__END_%s_(\d+)__\n" % (n, n, n)
        while True:
            if match := re.search(pattern, self._buf, re.DOTALL):
                self._buf = self._buf[match.end() :]
                out, err = (g.decode(errors="replace") for g in match.group(1, 2))
                return int(match.group(3)), out, err
            if probing and marker in self._buf:  # agent just started: probe again now
                self._buf = self._buf.replace(marker, b"")
                return None
            if (remaining := until - time.monotonic()) <= 0:
                return None
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise RuntimeError(f"guest console closed: {self._tail()}")
            self.transcript = (self.transcript + chunk)[-65536:]
            self._buf = (self._buf + chunk).replace(b"\r\n", b"\n")

    def _tail(self) -> str:
        return self.transcript[-2000:].decode(errors="replace")
