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
