"""The `standby` application: one typer app, composed of the command modules.

Exit codes: 0 ok; 1 other standby error; 2 bad configuration or input; 3 not found;
4 authentication; 5 not supported / cannot be protected; 6 plugin failure; 7 transient
(retry); 8 busy (another standby process holds the VM or site); 9 integrity (a vault
record or chunk failed its authentication); 130 interrupted.

Command modules import the engine, the lifecycle and rich inside their commands, so a
command loads only what it uses.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from standby.core.errors import StandbyError

from . import common, cost, failover, info, plans, protect, replicate, sites, vault

app = typer.Typer(
    help="standby: replicate VMs to a DR site, keep recovery points, fail over.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    home_dir: Annotated[
        Path | None,
        typer.Option(
            "--home",
            help="State and config directory (default $STANDBY_HOME or ~/.config/standby).",
        ),
    ] = None,
) -> None:
    common.set_home(home_dir)


for _module in (sites, protect, replicate, info, failover, cost, plans, vault):
    _module.register(app)


def main() -> None:
    """Entry point: run the app and turn standby errors into one line and an exit code."""
    try:
        app()
    except StandbyError as exc:
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; the next run resumes where this one stopped\n")
        sys.exit(130)
