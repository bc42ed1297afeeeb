"""Start and stop an Azurite blob service as a child process (for tests and demos)."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from doubles.procs import kill_pid, stop_pid

ACCOUNT = "devstoreaccount1"
#: The documented, public Azurite development account key (not a secret).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
BINARY = Path(__file__).parent / "azurite" / "node_modules" / ".bin" / "azurite-blob"
_LISTEN = re.compile(r"listens on (https?)://127\.0\.0\.1:(\d+)")


@dataclass
class Azurite:
    """A running Azurite blob service; ``endpoint`` is the account URL."""

    proc: subprocess.Popen[bytes]
    port: int
    scheme: str
    cert: Path | None
    log: Path
    account: str = ACCOUNT
    key: str = KEY
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        """Process id of the node process."""
        return self.proc.pid

    @property
    def endpoint(self) -> str:
        """Blob endpoint including the account, e.g. ``https://127.0.0.1:PORT/devstoreaccount1``."""
        return f"{self.scheme}://127.0.0.1:{self.port}/{self.account}"

    @property
    def connection_string(self) -> str:
        """A storage connection string for this instance."""
        return (
            f"DefaultEndpointsProtocol={self.scheme};AccountName={self.account};"
            f"AccountKey={self.key};BlobEndpoint={self.endpoint};"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully with SIGINT (SIGKILL if it does not exit in ``timeout``)."""
        stop_pid(self.proc, signal.SIGINT, timeout)
        self._stopped = True

    def kill(self) -> None:
        """Kill immediately (simulates a crash)."""
        kill_pid(self.proc)
        self._stopped = True


def _ready(url: str, cert: Path | None) -> bool:
    ctx = ssl.create_default_context(cafile=str(cert)) if cert else None
    try:
        with urllib.request.urlopen(url, timeout=2, context=ctx):
            return True
    except urllib.error.HTTPError:
        return True  # 403 (no auth) means the service answers
    except (OSError, ssl.SSLError):
        return False


def start_azurite(
    workdir: Path,
    cert: Path | None = None,
    key: Path | None = None,
    persist_dir: Path | None = None,
    timeout: float = 20.0,
    port: int = 0,
) -> Azurite:
    """Start ``azurite-blob`` on a free 127.0.0.1 port and wait until it answers.

    HTTPS is used when ``cert`` and ``key`` are given. Blobs are kept in memory unless
    ``persist_dir`` is given (then ``--location persist_dir``). The binary can be
    overridden with the ``AZURITE_BLOB`` environment variable.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    binary = os.environ.get("AZURITE_BLOB", str(BINARY))
    args = [binary, "--silent", "--skipApiVersionCheck", "--disableTelemetry"]
    args += ["--blobHost", "127.0.0.1", "--blobPort", str(port)]
    if persist_dir is not None:
        persist_dir.mkdir(parents=True, exist_ok=True)
        args += ["--location", str(persist_dir)]
    else:
        args += ["--inMemoryPersistence"]
    if cert is not None and key is not None:
        args += ["--cert", str(cert), "--key", str(key)]
    log = workdir / "azurite.log"
    log.unlink(missing_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"azurite exited with {proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"azurite did not start: {log.read_text()}")
            match = _LISTEN.search(log.read_text(errors="replace"))
            if match:
                az = Azurite(
                    proc, int(match[2]), match[1], cert if match[1] == "https" else None, log
                )
                if _ready(f"{az.endpoint}?comp=list", az.cert):
                    return az
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
