"""The Hyper-V control layer against the WinRM double: inventory in one round trip, pinned
TLS, one-line errors (issue 10, first part)."""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from doubles.certs import make_cert
from doubles.hyperv_host import HyperVHost, Nic
from doubles.winrm import WinRMDouble

from standby.core.config import Site
from standby.core.errors import AuthError, ConfigError, NotFound
from standby.core.model import Firmware
from standby.plugins.hyperv.conn import HyperVOptions, PowerShell
from standby.plugins.hyperv.inventory import list_vms

MiB = 1 << 20


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[HyperVHost, WinRMDouble]]:
    model = HyperVHost(tmp_path / "vms")
    model.add_vm(
        "web01", [64, 16], generation=2, nics=[Nic("Network Adapter", "00155D0A0B0C", "LAN")]
    )
    model.add_vm("legacy", [32], generation=1, cpus=1, memory=512 * MiB, state="Off")
    model.add_vm("web01-replica", [64], notes="standby:replica protection 3")
    cert, key = make_cert(tmp_path / "tls")
    double = WinRMDouble(cert, key, "HV\\standby", "p4ss", model.handle).start()
    try:
        yield model, double
    finally:
        double.stop()


def _opts(double: WinRMDouble, tmp_path: Path, **keys: object) -> HyperVOptions:
    os.environ["STANDBY_TEST_HV_PASSWORD"] = "p4ss"
    raw = {"host": "127.0.0.1", "port": double.port, "user": "HV\\standby",
           "password": "env:STANDBY_TEST_HV_PASSWORD", "transport": "basic",
           "ca_file": str(double.cert), **keys}  # fmt: skip
    return Site("hv", "hyperv", tmp_path / "sites/hv.toml", raw).options(HyperVOptions)


def test_inventory_in_one_round_trip(host: tuple[HyperVHost, WinRMDouble], tmp_path: Path) -> None:
    _model, double = host
    ps = PowerShell(_opts(double, tmp_path))
    vms = {v.name: v for v in list_vms(ps)}
    assert set(vms) == {"web01", "legacy"}, "standby's own replica VMs are not listed"
    web = vms["web01"]
    assert web.firmware is Firmware.UEFI and web.extra["generation"] == "2"
    assert [(d.name, d.size) for d in web.disks] == [("scsi0-0", 64 * MiB), ("scsi0-1", 16 * MiB)]
    assert web.nics[0].mac == "00:15:5d:0a:0b:0c" and web.nics[0].network == "LAN"
    legacy = vms["legacy"]
    assert legacy.firmware is Firmware.BIOS and legacy.disks[0].name == "ide0-0"
    assert (legacy.cpus, legacy.memory_mib, legacy.power_state) == (1, 512, "shutoff")
    assert ps.round_trips == 1 and len(double.scripts) == 1
    assert double.scripts[0].rstrip().endswith("ConvertTo-Json -Depth 6 -Compress")


def test_a_powershell_error_is_one_line_with_the_cmdlets_message(
    host: tuple[HyperVHost, WinRMDouble], tmp_path: Path
) -> None:
    ps = PowerShell(_opts(host[1], tmp_path))
    with pytest.raises(NotFound) as err:
        ps.run("Get-VM -Name 'ghost'")
    assert str(err.value) == (
        f"Hyper-V host 127.0.0.1:{host[1].port}: Get-VM : Hyper-V was unable to find a virtual "
        'machine with name "ghost".'
    )
    assert err.value.exit_code == 3


def test_wrong_password_is_exit_4(host: tuple[HyperVHost, WinRMDouble], tmp_path: Path) -> None:
    for transport in ("basic", "ntlm"):
        ps = PowerShell(_opts(host[1], tmp_path, transport=transport))
        os.environ["STANDBY_TEST_HV_PASSWORD"] = "wrong"
        with pytest.raises(AuthError, match="login failed for user") as err:
            ps.run("Get-VM")
        assert err.value.exit_code == 4 and "wrong" not in str(err.value)


def test_ntlm_with_message_encryption_reads_the_inventory(
    host: tuple[HyperVHost, WinRMDouble], tmp_path: Path
) -> None:
    ps = PowerShell(_opts(host[1], tmp_path, transport="ntlm"))
    assert {v.name for v in list_vms(ps)} == {"web01", "legacy"}


def test_tls_is_pinned_never_off(host: tuple[HyperVHost, WinRMDouble], tmp_path: Path) -> None:
    double = host[1]
    unpinned = PowerShell(_opts(double, tmp_path, ca_file=None))
    with pytest.raises(ConfigError, match=r"certificate not trusted.*thumbprint"):
        unpinned.run("Get-VM")
    der = ssl.PEM_cert_to_DER_cert(double.cert.read_text())
    right = hashlib.sha256(der).hexdigest()
    pinned = PowerShell(_opts(double, tmp_path, ca_file=None, thumbprint=right))
    assert len(list_vms(pinned)) == 2
    wrong = PowerShell(_opts(double, tmp_path, ca_file=None, thumbprint="ab" * 32))
    with pytest.raises(ConfigError, match=r"expected AB:AB.*seen " + right[:2].upper()):
        wrong.run("Get-VM")
