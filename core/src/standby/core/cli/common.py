"""What every command shares: the home directory, output (JSON or rich), progress bars.

rich is imported only when something is printed for people: a `--json` run or a
replication without a terminal never loads it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from standby.core import config
from standby.core.model import size_text

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from standby.core.state import State

__all__ = [
    "BarProgress",
    "JsonOpt",
    "emit",
    "err",
    "home",
    "home_state",
    "out",
    "plain",
    "say",
    "size_text",
]

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]

_home: list[Path | None] = [None]


def set_home(path: Path | None) -> None:
    _home[0] = path


def home() -> Path:
    """`--home`, else $STANDBY_HOME, else ~/.config/standby."""
    return _home[0] or config.home()


@contextmanager
def home_state() -> Iterator[State]:
    """The home's state database alone (no engine, no plugins), closed at the end."""
    from standby.core.engine import open_state

    state = open_state(home())
    try:
        yield state
    finally:
        state.dispose()


def emit(data: Any) -> None:
    """JSON to stdout for scripts."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def say(line: str) -> None:
    """Progress for people, on stderr (stdout stays clean for --json)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class _LazyConsole:
    """A rich Console made on first use."""

    def __init__(self, stderr: bool = False, **kw: Any) -> None:
        self._stderr = stderr
        self._kw = kw
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr, **self._kw)
        return self._console

    def print(self, *args: Any, **kw: Any) -> None:
        self.console.print(*args, **kw)

    @property
    def is_terminal(self) -> bool:
        stream = sys.stderr if self._stderr else sys.stdout
        return stream.isatty()


out = _LazyConsole()
err = _LazyConsole(stderr=True)
plain = _LazyConsole(soft_wrap=True, highlight=False)
"""For lines that must never be wrapped or highlighted (plan views)."""


def table(*headers: str) -> Any:
    """A rich table with these column headers."""
    from rich.table import Table

    return Table(*headers)


class BarProgress:
    """Engine progress as a rich bar on stderr (only on a terminal)."""

    def __init__(self, steps: bool = True) -> None:
        self.steps = steps
        self.bar: Progress | None = None
        self.task: TaskID | None = None

    def start(self, description: str, total: int) -> None:
        if total == 0:  # a step of a long operation: one line, terminal or not
            if self.steps:
                err.print(f"  {description}", highlight=False)
            return
        if not err.is_terminal:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err.console,
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task, amount)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
