"""Run the Azure doubles (Azurite + fake ARM) until SIGINT/SIGTERM, for demos and by hand.

    python tests/doubles/serve_azure.py --dir DIR

Writes DIR/site.toml (an Azure site file pointing at both, secrets as env: references) and
DIR/env (the variables those references name), then DIR/ready; removes DIR/ready on exit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.azure import KEY_ENV, SECRET_ENV, azure_doubles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--container", default="replicas")
    args = parser.parse_args(argv)
    base: Path = args.dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    stopping: list[int] = []  # a signal handler may only append here: it can run at any
    # point of the main thread, even inside a lock another handler call holds
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    with azure_doubles(persist=True, base=base) as env:
        env.make_dr_network()
        (base / "site.toml").write_text(env.site_toml(args.container))
        (base / "env").write_text(
            "".join(f"export {k}='{os.environ[k]}'\n" for k in (KEY_ENV, SECRET_ENV))
        )
        (base / "ready").write_text(f"{env.azurite.endpoint} {env.arm.url}\n")
        print(f"ready: blob {env.azurite.endpoint}  ARM {env.arm.url}", flush=True)
        while not stopping:
            time.sleep(0.2)
        (base / "ready").unlink(missing_ok=True)
        (base / "requests.log").write_text(
            "".join(f"{m} {p} {st}\n" for m, p, st in env.arm.requests)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
