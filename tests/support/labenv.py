"""A lab of two embedded libvirt hosts (source and DR), their sites, and an engine."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standby.core.engine import Engine
from standby.core.lifecycle import Lifecycle
from standby.core.state import State
from standby.plugins.physical import lab

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
STANDBY = [sys.executable, "-m", "standby.core"]


@dataclass
class Lab:
    """Two embedded libvirt hosts (source and DR), their sites, and an engine over them."""

    base: Path
    home: Path
    src_uri: str
    dr_uri: str
    _engine: Engine | None = None
    _state: State | None = None
    vms: list[str] = field(default_factory=list)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._state = State.at(self.home)
            self._engine = Engine(self._state, self.home, workers=4)
        return self._engine

    @property
    def lifecycle(self) -> Lifecycle:
        """Failover, cleanup, commit, re-protect and failback on the lab's engine."""
        return Lifecycle(self.engine)

    @property
    def src(self) -> Any:
        """The source host's libvirt connection (shared with the engine's source plugin)."""
        return self.engine.source("src").conn

    @property
    def dr(self) -> Any:
        return self.engine.target("dr").conn

    def release(self) -> None:
        """Close every connection so another process (the CLI) can open the embedded roots."""
        if self._engine is not None:
            self._engine.close()
            assert self._state is not None
            self._state.dispose()
        self._engine = None
        self._state = None

    def create_vm(self, name: str, disks: list[tuple[str, int, str]]) -> str:
        self.vms.append(name)
        return lab.create_vm(self.src, name, self.base / "disks", disks)

    def write(self, vm: str, dev: str, offset: int, length: int, pattern: int) -> None:
        lab.guest_write(self.src, vm, dev, offset, length, pattern)

    def zero(self, vm: str, dev: str, offset: int, length: int) -> None:
        lab.guest_discard(self.src, vm, dev, offset, length)

    def flush(self, vm: str, dev: str) -> None:
        lab.guest_flush(self.src, vm, dev)

    def disk_path(self, vm: str, dev: str, fmt: str = "qcow2") -> Path:
        return self.base / "disks" / f"{vm}-{dev}.{fmt}"

    def cli(
        self,
        *args: str,
        check: bool = False,
        env: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """Run the standby CLI in a subprocess (releases this process's roots first)."""
        self.release()
        full_env = {**os.environ, "STANDBY_HOME": str(self.home), **(env or {})}
        proc = subprocess.run(
            [*STANDBY, *args], capture_output=True, text=True, env=full_env, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"standby {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc


def write_site(home: Path, name: str, text: str) -> None:
    (home / "sites").mkdir(parents=True, exist_ok=True)
    (home / "sites" / f"{name}.toml").write_text(text)


def kill_qemu(base: Path) -> None:
    subprocess.run(["pkill", "-9", "-f", f"qemu-system.*{base}"], check=False)
