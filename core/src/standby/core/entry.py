"""The `standby` console script: the CLI with a quick start and a quick exit.

The garbage collector is off while the CLI's modules load (their objects live as long as
the process) and those objects are then frozen out of later collections. At the end the
process leaves without tearing its modules down: every resource (state database, plugin
connections, threads) was released by the command itself, output is flushed, and a
teardown would only cost time (about 0.2 s).
"""

from __future__ import annotations

import gc
import os
import sys


def main() -> None:
    gc.disable()
    from standby.core.cli.app import main as run

    gc.freeze()
    gc.enable()
    code = 0
    try:
        run()
    except SystemExit as exc:
        if isinstance(exc.code, int):
            code = exc.code
        elif exc.code is not None:
            sys.stderr.write(f"{exc.code}\n")
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
