"""A Hyper-V host for tests: the host model behind the WinRM double, its VM folder served by
Samba on a loopback port, and the site keys that reach both."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from doubles.certs import make_cert
from doubles.hyperv_host import HyperVHost
from doubles.samba import Samba, start_samba
from doubles.vmm import Cloud, VmmServer
from doubles.winrm import WinRMDouble

from standby.core.config import Site
from standby.plugins.hyperv import vhdx
from support.tomlfmt import value as _toml

USER, PASSWORD = "HV\\standby", "Hv-p4ss!"


@dataclass
class HyperVLab:
    """One host: `model` (VMs, disks), `winrm` (its listener), `samba` (its share)."""

    model: HyperVHost
    winrm: WinRMDouble
    samba: Samba
    env_prefix: str

    def keys(self, **extra: object) -> dict[str, object]:
        """A `plugin = "hyperv"` site's keys; secrets go by `env:` reference."""
        os.environ[f"{self.env_prefix}_PASSWORD"] = PASSWORD
        os.environ[f"{self.env_prefix}_SMB_PASSWORD"] = self.samba.password
        return {
            "host": "127.0.0.1",
            "port": self.winrm.port,
            "user": USER,
            "password": f"env:{self.env_prefix}_PASSWORD",
            "transport": "ntlm",
            "ca_file": str(self.winrm.cert),
            "share": self.samba.share,
            "share_root": self.model.drive,
            "smb_port": self.samba.port,
            "smb_user": self.samba.user,
            "smb_password": f"env:{self.env_prefix}_SMB_PASSWORD",
            **extra,
        }

    def site(self, tmp: Path, name: str = "hv", **extra: object) -> Site:
        return Site(name, "hyperv", tmp / f"sites/{name}.toml", self.keys(**extra))

    def write_site(self, home: Path, name: str = "hv", **extra: object) -> None:
        keys = {"plugin": "hyperv", **self.keys(**extra)}
        (home / "sites").mkdir(parents=True, exist_ok=True)
        (home / "sites" / f"{name}.toml").write_text(
            "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items() if v is not None)
        )

    def chain_bytes(self, winpath: str, offset: int = 0, length: int | None = None) -> bytes:
        """Guest bytes of the VHDX the host calls `winpath`, read through its parents (the
        files under the host's folder, not over the share)."""
        opened: list[vhdx.LocalFile] = []

        def parent(loc: dict[str, str], child: str) -> tuple[vhdx.LocalFile, str]:
            path = vhdx.parent_path(loc, child)
            opened.append(vhdx.LocalFile(self.model.local(path)))
            return opened[-1], path

        opened.append(vhdx.LocalFile(self.model.local(winpath)))
        try:
            r = vhdx.VhdxReader(opened[0], winpath, parent)
            return r.read(offset, r.size - offset if length is None else length)
        finally:
            for f in opened:
                f.close()

    def stop(self) -> None:
        try:
            self.winrm.stop()
        finally:
            self.samba.stop()


def start_hyperv(work: Path, env_prefix: str = "STANDBY_TEST_HV") -> HyperVLab:
    """A host with no VMs yet (add them with `lab.model.add_vm`)."""
    model = HyperVHost(work / "host")
    model.root.mkdir(parents=True, exist_ok=True)
    cert, key = make_cert(work / "tls")
    winrm = WinRMDouble(cert, key, USER, PASSWORD, model.handle).start()
    try:
        samba = start_samba(work / "smb", model.root)
    except BaseException:
        winrm.stop()
        raise
    return HyperVLab(model, winrm, samba, env_prefix)


@dataclass
class VmmLab:
    """A VMM server double over Hyper-V host labs: `model` (clouds, networks) and its
    WinRM listener; the hosts are the labs' own (their WinRM and Samba)."""

    model: VmmServer
    winrm: WinRMDouble
    hosts: dict[str, HyperVLab]

    def write_site(self, home: Path, name: str, cloud: str, **extra: object) -> None:
        os.environ["STANDBY_TEST_VMM_PASSWORD"] = PASSWORD
        keys: dict[str, object] = {
            "plugin": "vmm",
            "host": "127.0.0.1",
            "port": self.winrm.port,
            "user": USER,
            "password": "env:STANDBY_TEST_VMM_PASSWORD",
            "ca_file": str(self.winrm.cert),
            "cloud": cloud,
            **extra,
        }
        body = "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items() if v is not None)
        for host, lab in self.hosts.items():  # how standby reaches each managed host
            body += f'\n[hosts."{host}"]\n' + "".join(
                f"{k} = {_toml(v)}\n" for k, v in lab.keys().items() if v is not None
            )
        (home / "sites").mkdir(parents=True, exist_ok=True)
        (home / "sites" / f"{name}.toml").write_text(body)

    def stop(self) -> None:
        self.winrm.stop()


def start_vmm(work: Path, hosts: dict[str, HyperVLab], clouds: dict[str, Cloud]) -> VmmLab:
    """A VMM server managing `hosts` (by the names VMM gives them) in `clouds`."""
    model = VmmServer({n: lab.model for n, lab in hosts.items()}, clouds)
    cert, key = make_cert(work / "tls")
    winrm = WinRMDouble(cert, key, USER, PASSWORD, model.handle).start()
    return VmmLab(model, winrm, hosts)
