"""Where the engine reports progress: a rich bar in the CLI, nothing in tests."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Progress of long work: `start` with a total in bytes (0: a one-line step)."""

    def start(self, description: str, total: int) -> None: ...
    def advance(self, amount: int) -> None: ...
    def finish(self) -> None: ...


class NullProgress:
    """Progress that goes nowhere."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def finish(self) -> None:
        pass
