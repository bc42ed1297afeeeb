"""The AWS double for demos and by hand, and a few guest-side tools over it.

python tests/doubles/serve_aws.py serve --dir DIR
    Start the double (moto + EBS shim, HTTPS) until SIGINT/SIGTERM, make what an operator
    would have in the account (a DR VPC/subnet/security group, an EC2 instance `ec2app`
    with two volumes holding data), write DIR/site.toml, DIR/env and then DIR/ready.
python tests/doubles/serve_aws.py write --dir DIR INSTANCE DEVICE OFFSET LENGTH PATTERN
    Write into an instance's volume as its guest would.
python tests/doubles/serve_aws.py has --dir DIR INSTANCE DEVICE OFFSET LENGTH PATTERN
    Exit 0 when the range holds the pattern.
python tests/doubles/serve_aws.py same --dir DIR INSTANCE DEVICE IMAGE [--format F]
    Compare an instance's volume with a local image (qemu-img compare).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from doubles.moto_proc import ACCESS_KEY, SECRET_KEY, Moto
from support.aws import KEY_ID_ENV, SECRET_ENV, AwsEnv, aws_double

MiB = 1 << 20


def _attach(base: Path) -> AwsEnv:
    """The running double of `serve --dir base` (for the guest-side tools)."""
    info = json.loads((base / "ready").read_text())
    proc: Any = None  # not ours: `serve` owns the process
    moto = Moto(proc=proc, base=base / "moto", port=info["port"], cert=Path(info["cert"]))
    env = AwsEnv(base, moto)
    env.instances = info["instances"]
    return env


def serve(base: Path) -> int:
    stopping: list[int] = []  # a signal handler may only append here
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    with aws_double(base) as env:
        env.make_dr_network()
        inst = env.make_instance("ec2app", [1, 1], itype="t3.small")
        rng = random.Random(7)
        env.moto.write(env.volume(inst, "xvda"), 0, rng.randbytes(4 * MiB))
        env.moto.write(env.volume(inst, "sdf"), 64 * MiB, b"\x5a" * 2 * MiB)
        (base / "site.toml").write_text(env.site_toml())
        (base / "env").write_text(
            f"export {KEY_ID_ENV}='{ACCESS_KEY}'\nexport {SECRET_ENV}='{SECRET_KEY}'\n"
        )
        ready = {"port": env.moto.port, "cert": str(env.moto.cert), "instances": env.instances}
        (base / "ready").write_text(json.dumps(ready))
        print(f"ready: AWS double at {env.moto.url}; instance ec2app = {inst}", flush=True)
        while not stopping:
            time.sleep(0.2)
        (base / "ready").unlink(missing_ok=True)
    return 0


def _range(env: AwsEnv, args: argparse.Namespace) -> tuple[str, int, int, int]:
    vol = env.volume(args.instance, args.device)
    return vol, int(args.offset), int(args.length), int(args.pattern, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("serve", "write", "has", "same"):
        p = sub.add_parser(name)
        p.add_argument("--dir", type=Path, required=True)
        if name in ("write", "has", "same"):
            p.add_argument("instance")
            p.add_argument("device")
        if name in ("write", "has"):
            p.add_argument("offset")
            p.add_argument("length")
            p.add_argument("pattern")
        if name == "same":
            p.add_argument("image", type=Path)
            p.add_argument("--format", default="qcow2")
    args = parser.parse_args(argv)
    base: Path = args.dir.resolve()
    if args.cmd == "serve":
        base.mkdir(parents=True, exist_ok=True)
        return serve(base)
    env = _attach(base)
    if args.cmd == "write":
        vol, off, n, byte = _range(env, args)
        env.moto.write(vol, off, bytes([byte]) * n)
        print(f"wrote {n} bytes of {byte:#04x} at {off} of {args.instance}/{args.device} ({vol})")
        return 0
    if args.cmd == "has":
        vol, off, n, byte = _range(env, args)
        ok = env.moto.image(n, off, volume=vol) == bytes([byte]) * n
        print(f"{args.instance}/{args.device} at {off}: {'holds' if ok else 'lacks'} {byte:#04x}")
        return 0 if ok else 1
    vol = env.volume(args.instance, args.device)
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", "-f", args.format, "-U", str(args.image)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    size = int(json.loads(info.stdout)["virtual-size"])
    raw = base / f"{args.instance}-{args.device}.raw"
    env.moto.save_image(raw, size, volume=vol)
    proc = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", args.format, "-F", "raw", str(args.image), str(raw)],
        capture_output=True, text=True,
    )  # fmt: skip
    raw.unlink()
    print(proc.stdout.strip() or proc.stderr.strip())
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
