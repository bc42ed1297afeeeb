"""VMware sites pointing at a running vcsim double (tests/doubles/vcsim)."""

from __future__ import annotations

import os
from pathlib import Path

from doubles.vcsim_proc import Vcsim

from standby.core.config import Site

PASSWORD_ENV = "STANDBY_TEST_VC_PASSWORD"


def vmware_site(sim: Vcsim, tmp: Path, name: str = "vc", **extra: object) -> Site:
    """A `plugin = "vmware"` site for the double; its password goes by `env:` reference."""
    os.environ[PASSWORD_ENV] = sim.password
    raw: dict[str, object] = {
        "host": sim.host,
        "port": sim.port,
        "user": sim.user,
        "password": f"env:{PASSWORD_ENV}",
        "datacenter": sim.datacenter,
        "thumbprint": sim.thumbprint,
        **extra,
    }
    return Site(name=name, plugin="vmware", path=tmp / f"sites/{name}.toml", raw=raw)


def write_vc_site(home: Path, sim: Vcsim, name: str = "vc") -> None:
    """`sites/NAME.toml` in a standby home for the double (password by `env:` reference)."""
    os.environ[PASSWORD_ENV] = sim.password
    (home / "sites").mkdir(parents=True, exist_ok=True)
    (home / "sites" / f"{name}.toml").write_text(
        f'plugin = "vmware"\nhost = "{sim.host}"\nport = {sim.port}\nuser = "{sim.user}"\n'
        f'password = "env:{PASSWORD_ENV}"\ndatacenter = "{sim.datacenter}"\n'
        f'thumbprint = "{sim.thumbprint}"\n'
    )


def vmdk_files(sim: Vcsim, vm: str) -> dict[str, Path]:
    """Each disk's backing flat file, by standby's disk name."""
    return {f"disk{d['deviceKey']}": Path(d["file"]) for d in sim.disks(vm)}
