"""The service's control socket: `standby replicate VM` handed to a running `--watch`."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_watch import fleet  # noqa: F401  (the fixture)

from standby.core import entry
from standby.core.engine import Engine
from standby.core.engine.control import SOCKET, ControlServer, socket_path
from standby.core.engine.watch import Watcher
from standby.core.errors import Busy
from standby.core.locks import vm_lock


@pytest.fixture
def service(fleet: Any) -> Iterator[tuple[Engine, Watcher]]:  # noqa: F811
    engine, _src = fleet
    w = Watcher(engine, interval=0.2, serve=True, only="nothing-scheduled")
    t = threading.Thread(target=w.run)
    t.start()
    deadline = time.monotonic() + 10
    while not socket_path(engine.home).exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    yield engine, w
    w.stop.set()
    t.join(timeout=30)
    assert not socket_path(engine.home).exists(), "the socket goes with the service"


def delegate(engine: Engine, *args: str) -> int | None:
    return entry._delegate(["--home", str(engine.home), *args])


def test_a_one_shot_replicate_is_served_by_the_running_service(service: Any, capsys: Any) -> None:
    engine, _w = service
    assert delegate(engine, "replicate", "fast1", "--json") == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["vm"] == "fast1" and report["kind"] == "full"
    assert report["served_by"] == os.getpid()
    assert delegate(engine, "replicate", "fast1") == 0
    assert capsys.readouterr().out.startswith("fast1: point 2 (")


def test_an_ask_while_the_service_cycles_the_vm_waits_for_that_cycle(
    service: Any, capsys: Any
) -> None:
    engine, w = service
    with w._idle:
        w._busy.add("fast1")  # as if a scheduled cycle (or an earlier ask's housekeeping) ran

    def finish() -> None:
        time.sleep(0.3)
        with w._idle:
            w._busy.discard("fast1")
            w._idle.notify_all()

    t = threading.Thread(target=finish)
    t.start()
    started = time.monotonic()
    assert delegate(engine, "replicate", "fast1") == 0, capsys.readouterr().err
    assert time.monotonic() - started >= 0.3
    t.join()
    assert capsys.readouterr().out.startswith("fast1: point 1 (")


def test_errors_come_back_as_one_line_and_the_exit_code(service: Any, capsys: Any) -> None:
    engine, _w = service
    assert delegate(engine, "replicate", "ghost") == 3
    err = capsys.readouterr().err
    assert err.startswith("error: VM 'ghost' is not protected") and err.count("\n") == 1
    with vm_lock(engine.home, "fast2", "replication"):
        assert delegate(engine, "replicate", "fast2") == 8
    assert "already running" in capsys.readouterr().err


def test_other_commands_and_homes_without_a_service_run_in_process(fleet: Any) -> None:  # noqa: F811
    engine, _src = fleet
    assert delegate(engine, "replicate", "fast1") is None, "no socket: run here"
    path = socket_path(engine.home)
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on (its process died)
    assert delegate(engine, "replicate", "fast1") is None
    assert entry._request(["replicate", "--watch"]) is None
    assert entry._request(["status"]) is None
    assert entry._request(["replicate", "a", "b"]) is None
    assert entry._request(["replicate", "a", "--parallel", "2"]) is None


def test_one_service_per_home(service: Any) -> None:
    engine, _w = service
    with pytest.raises(Busy, match="already runs"):
        ControlServer(engine.home, lambda vm, wait: None).start()  # type: ignore[arg-type,return-value]


def test_malformed_and_unknown_requests_are_refused(service: Any) -> None:
    engine, _w = service
    for raw in (b"not json\n", b'{"op": "format-disks"}\n'):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(socket_path(engine.home)))
        s.sendall(raw)
        reply = json.loads(s.makefile("rb").readline())
        s.close()
        assert reply["ok"] is False and reply["exit_code"] == 2


def test_the_client_and_the_server_agree_on_the_socket() -> None:
    assert entry.SOCKET == SOCKET
