"""Run the AWS double (moto's server behind the EBS shim) until SIGINT/SIGTERM.

    python tests/doubles/serve_moto.py --dir DIR [--port N] [--access-key AKID ...]

HTTPS with DIR/tls/cert.pem when it exists (made by the caller), blocks under DIR/blocks.
Writes DIR/port once it listens; removes it on exit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--access-key", action="append", default=[])
    args = parser.parse_args(argv)
    base: Path = args.dir.resolve()
    base.mkdir(parents=True, exist_ok=True)

    from cheroot import wsgi
    from cheroot.ssl.builtin import BuiltinSSLAdapter
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    from doubles.moto_ebs import BlockStore, Shim, patch_moto

    store = BlockStore(base / "blocks")
    patch_moto(store)
    app = Shim(DomainDispatcherApplication(create_backend_app), store, args.access_key)
    # cheroot, not werkzeug's development server: that one closes every connection, so each
    # call would pay a TLS handshake; AWS keeps connections alive.
    server = wsgi.Server(("127.0.0.1", args.port), app, numthreads=32, request_queue_size=64)
    server.keep_alive_conn_limit = 128  # cheroot's default (10) drops pooled connections
    cert, key = base / "tls" / "cert.pem", base / "tls" / "key.pem"
    if cert.exists():
        server.ssl_adapter = BuiltinSSLAdapter(str(cert), str(key))
    stopping: list[int] = []  # a signal handler only appends (it may interrupt anything)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    server.prepare()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    port = server.bind_addr[1]
    (base / "port").write_text(f"{port}\n")
    print(f"ready: {'https' if cert.exists() else 'http'}://127.0.0.1:{port}", flush=True)
    while not stopping:
        thread.join(0.2)
    (base / "port").unlink(missing_ok=True)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
