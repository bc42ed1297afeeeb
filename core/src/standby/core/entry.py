"""The `standby` console script: the CLI with a quick start and a quick exit.

`standby replicate VM [--json] [--wait]` is handed to the home's running service (a
`standby replicate --watch`, see `standby.core.engine.control`) when one listens: this
module then needs nothing but the standard library. Otherwise the CLI runs in-process.

The garbage collector is off while the CLI's modules load (their objects live as long as
the process) and those objects are then frozen out of later collections. At the end the
process leaves without tearing its modules down: every resource (state database, plugin
connections, threads) was released by the command itself, output is flushed, and a
teardown would only cost time (about 0.2 s).
"""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
from pathlib import Path

SOCKET = Path("run") / "standby.sock"  # the same as standby.core.engine.control.SOCKET


def main() -> None:
    code = _delegate(sys.argv[1:])
    if code is None:
        code = _run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run() -> int:
    gc.disable()
    from standby.core.cli.app import main as run

    gc.freeze()
    gc.enable()
    try:
        run()
    except SystemExit as exc:
        if isinstance(exc.code, int):
            return exc.code
        if exc.code is not None:
            sys.stderr.write(f"{exc.code}\n")
            return 1
    return 0


def _request(argv: list[str]) -> tuple[Path, dict[str, object], bool] | None:
    """`[--home H] replicate VM [--json] [--wait]` as (home, request, json), else None."""
    args = list(argv)
    home_arg = None
    if args[:1] == ["--home"] and len(args) >= 2:
        home_arg, args = args[1], args[2:]
    if args[:1] != ["replicate"]:
        return None
    rest = args[1:]
    names = [a for a in rest if not a.startswith("-")]
    flags = {a for a in rest if a.startswith("-")}
    if len(names) != 1 or not flags <= {"--json", "--wait"}:
        return None
    env = os.environ.get("STANDBY_HOME")
    home = Path(home_arg) if home_arg else Path(env) if env else Path.home() / ".config/standby"
    request = {"op": "replicate", "vm": names[0], "wait": "--wait" in flags}
    return home, request, "--json" in flags


def _delegate(argv: list[str]) -> int | None:
    """Serve the command through the home's service; None when there is none to ask."""
    found = _request(argv)
    if found is None:
        return None
    home, request, as_json = found
    path = home / SOCKET
    if not path.exists():
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        s.close()
        return None  # nobody listens: run the command here
    try:
        with s, s.makefile("rwb") as f:
            f.write(json.dumps(request).encode() + b"\n")
            f.flush()
            line = f.readline()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; the service finishes the cycle it started\n")
        return 130
    if not line:
        sys.stderr.write("error: the standby service closed the connection; see its log\n")
        return 1
    reply = json.loads(line)
    if not reply.get("ok"):
        sys.stderr.write(f"error: {' '.join(str(reply.get('error')).split())}\n")
        return int(reply.get("exit_code", 1))
    report = {**reply["report"], "served_by": reply.get("served_by")}
    if as_json:
        sys.stdout.write(json.dumps([report], indent=2, default=str) + "\n")
    else:
        sys.stdout.write(reply["summary"] + "\n")
        for note in report.get("notes", []):
            sys.stdout.write(f"  note: {note}\n")
    return 0
