"""A child process that owns one embedded libvirt root, driven over a pipe.

libvirt allows one `qemu:///embed` root per process, but a DR job needs two at once (the
source host and the DR host). Each embedded root is therefore opened in its own child process
and used through thin proxies that forward method calls. The child exits when the parent's end
of the pipe closes, so a killed standby process never leaves a root locked.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

_Handle = tuple[str, int]


def _is_libvirt_object(value: Any) -> bool:
    return type(value).__module__ == "libvirt" and type(value).__name__.startswith("vir")


def _await_reconnect(libvirt: Any, libvirt_qemu: Any, conn: Any) -> None:
    """An embedded driver reconnects to QEMUs left running by an earlier process in the
    background; until it has, their domains look active but refuse work ("not running").
    Wait (at most 10 s) until each active domain's monitor answers."""
    deadline = time.monotonic() + 10
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        while time.monotonic() < deadline:
            try:
                libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-status"}', 0)
                break
            except libvirt.libvirtError:
                time.sleep(0.05)


def recover_interrupted_starts(root: str) -> list[str]:
    """Domains whose start was cut short when the process hosting the root died.

    The embedded driver lives in our process: killed during `create()`, it leaves a status
    file with an async `start` job that nobody will finish, and every later call on that
    domain waits for the job and fails. Such a domain never ran: stop its QEMU (paused at
    `-S`) and drop the status file, so libvirt sees it shut off. Other jobs (a backup of a
    running VM) are left alone.
    """
    import glob
    import os
    import re
    import signal

    recovered = []
    for status in glob.glob(os.path.join(root, "run", "qemu", "*.xml")):
        try:
            with open(status) as f:
                text = f.read()
        except OSError:
            continue
        if not re.search(r"<job [^>]*async='start'", text):
            continue
        name = os.path.basename(status)[: -len(".xml")]
        pid = re.search(r"<domstatus [^>]*pid='(\d+)'", text)
        if pid:
            try:
                with open(f"/proc/{pid.group(1)}/cmdline", "rb") as f:
                    cmdline = f.read()
                if f"guest={name},".encode() in cmdline:
                    os.kill(int(pid.group(1)), signal.SIGKILL)
            except OSError:
                pass
        os.unlink(status)
        recovered.append(name)
    return recovered


def _serve(uri: str, pipe: Connection) -> None:
    """Child side: open the root, then answer calls until the pipe closes."""
    import os
    from urllib.parse import parse_qs, urlparse

    # libvirt's embedded driver logs to stderr; keep that in the root's log directory instead.
    root = parse_qs(urlparse(uri).query).get("root", ["/tmp"])[0]
    os.makedirs(os.path.join(root, "log"), exist_ok=True)
    fd = os.open(
        os.path.join(root, "log", "standby-agent.log"),
        os.O_WRONLY | os.O_CREAT | os.O_APPEND,
        0o600,
    )
    os.dup2(fd, 2)
    os.close(fd)
    recover_interrupted_starts(root)
    import libvirt
    import libvirt_qemu

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    libvirt.virEventRegisterDefaultImpl()

    def loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, daemon=True).start()
    objects: dict[int, Any] = {}
    ids = itertools.count(1)

    def wrap(value: Any) -> Any:
        if _is_libvirt_object(value):
            i = next(ids)
            objects[i] = value
            return ("__obj__", i)
        if isinstance(value, list):
            return [wrap(v) for v in value]
        return value

    def unwrap(value: Any) -> Any:
        if isinstance(value, tuple) and len(value) == 2 and value[0] == "__obj__":
            return objects[value[1]]
        if isinstance(value, list):
            return [unwrap(v) for v in value]
        return value

    try:
        objects[0] = libvirt.open(uri)
        _await_reconnect(libvirt, libvirt_qemu, objects[0])
        pipe.send(("ok", None))
    except libvirt.libvirtError as exc:
        pipe.send(("err", (exc.get_error_code(), exc.get_error_message() or str(exc))))
        return
    while True:
        try:
            msg = pipe.recv()
        except (EOFError, OSError):
            break
        op, target, name, args, dead = msg
        for handle in dead:  # proxies the parent no longer holds
            objects.pop(handle, None)
        try:
            if op == "call":
                result = getattr(objects[target], name)(*unwrap(list(args)))
            elif op == "qemu":
                result = libvirt_qemu.qemuMonitorCommand(objects[target], *args)
            elif op == "drop":
                objects.pop(target, None)
                result = None
            else:
                raise ValueError(op)
            pipe.send(("ok", wrap(result)))
        except libvirt.libvirtError as exc:
            pipe.send(("err", (exc.get_error_code(), exc.get_error_message() or str(exc))))
        except Exception as exc:  # reported to the caller, never kills the agent
            pipe.send(("exc", f"{type(exc).__name__}: {exc}"))
    try:
        objects[0].close()
    except libvirt.libvirtError:
        pass
    sys.stderr.flush()
    os._exit(0)  # the root is closed; skip the interpreter's teardown


class Agent:
    """Parent side: the child process (a bare `python -m ...agent`, so it imports nothing of
    the CLI) and the lock around its pipe. Readiness is checked on first use, so several
    roots open in parallel."""

    def __init__(self, uri: str) -> None:
        parent, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "standby.plugins.physical.agent", uri, str(child.fileno())],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self.pipe = Connection(parent.detach())
        self.lock = threading.Lock()
        self.ready = False
        self.dead: list[int] = []
        """Handles of proxies that were garbage-collected; dropped with the next request."""

    @staticmethod
    def _check(reply: tuple[str, Any]) -> Any:
        kind, value = reply
        if kind == "ok":
            return value
        import libvirt

        if kind == "err":
            exc = libvirt.libvirtError(value[1])
            exc.err = (value[0], 0, value[1], 2, None, None, None, 0, 0)
            raise exc
        raise RuntimeError(value)

    def _recv(self) -> Any:
        try:
            return self._check(self.pipe.recv())
        except (EOFError, OSError):
            import libvirt

            return self._check(("err", (libvirt.VIR_ERR_NO_CONNECT, "libvirt agent exited")))

    def request(self, op: str, target: int, name: str, args: tuple[Any, ...]) -> Any:
        with self.lock:
            if not self.ready:
                self._recv()
                self.ready = True
            dead, self.dead = self.dead, []
            self.pipe.send((op, target, name, args, dead))
            return self._recv()

    def proxy(self, value: Any) -> Any:
        if isinstance(value, tuple) and len(value) == 2 and value[0] == "__obj__":
            return Proxy(self, value[1])
        if isinstance(value, list):
            return [self.proxy(v) for v in value]
        return value

    def close(self) -> None:
        """Close the pipe and wait (at most 10 s) until the child has closed the root."""
        try:
            self.pipe.close()
        finally:
            if not _exited(self.proc.pid, 10.0):
                self.proc.kill()
            self.proc.wait()


def _exited(pid: int, timeout: float) -> bool:
    """Wait for a child to exit without polling (a pidfd); False on timeout."""
    import os
    import select

    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):  # old kernel: wait the ordinary way
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


class Proxy:
    """Stands for a libvirt object living in the agent; method calls are forwarded.

    When a proxy is garbage-collected its object is dropped in the agent, so a long-running
    process (`replicate --watch`) does not make the agent grow."""

    def __init__(self, agent: Agent, handle: int) -> None:
        self._agent = agent
        self._handle = handle

    def __del__(self) -> None:
        if self._handle:
            self._agent.dead.append(self._handle)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any) -> Any:
            plain = [("__obj__", a._handle) if isinstance(a, Proxy) else a for a in args]
            if self._handle == 0 and name == "close":
                self._agent.close()
                return 0
            return self._agent.proxy(self._agent.request("call", self._handle, name, tuple(plain)))

        return call

    def qemu_monitor(self, command: str, flags: int) -> str:
        """libvirt_qemu.qemuMonitorCommand on this (domain) object."""
        return str(self._agent.request("qemu", self._handle, "", (command, flags)))


def open_embedded(uri: str) -> Proxy:
    """A proxy for `libvirt.open(uri)` living in a dedicated child process."""
    return Proxy(Agent(uri), 0)


if __name__ == "__main__":
    _serve(sys.argv[1], Connection(int(sys.argv[2])))
