"""The WinRM double answers pywinrm as a Windows host would (pinned TLS, Basic auth, CLIXML)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import winrm
from winrm.exceptions import InvalidCredentialsError

from doubles.certs import make_cert
from doubles.winrm import WinRMDouble


def handler(script: str) -> tuple[str, str, int]:
    if "Get-VM -Name nope" in script:
        return "", 'Get-VM : Hyper-V was unable to find a virtual machine with name "nope".', 1
    return json.dumps({"script": script}), "", 0


@pytest.fixture
def double(tmp_path: Path) -> Iterator[WinRMDouble]:
    cert, key = make_cert(tmp_path / "tls")
    d = WinRMDouble(cert=cert, key=key, user="standby", password="p4ss", handler=handler).start()
    try:
        yield d
    finally:
        d.stop()


def _session(d: WinRMDouble, password: str = "p4ss") -> winrm.Session:
    return winrm.Session(
        d.endpoint,
        auth=("standby", password),
        transport="basic",
        server_cert_validation="validate",
        ca_trust_path=str(d.cert),
    )


def test_run_ps_round_trip_and_errors(double: WinRMDouble) -> None:
    script = "Get-VM | Select-Object Name | ConvertTo-Json -Depth 4  # ünïcode"
    r = _session(double).run_ps(script)
    assert r.status_code == 0 and json.loads(r.std_out) == {"script": script}
    assert double.scripts == [script]
    bad = _session(double).run_ps("Get-VM -Name nope")
    assert bad.status_code == 1
    assert bad.std_err.decode() == (
        'Get-VM : Hyper-V was unable to find a virtual machine with name "nope".'
    )


def test_a_wrong_password_is_refused(double: WinRMDouble) -> None:
    with pytest.raises(InvalidCredentialsError):
        _session(double, "wrong").run_ps("Get-VM")


def test_an_unpinned_certificate_is_refused(double: WinRMDouble, tmp_path: Path) -> None:
    import requests

    other, _ = make_cert(tmp_path / "other")
    session = winrm.Session(
        double.endpoint,
        auth=("standby", "p4ss"),
        transport="basic",
        server_cert_validation="validate",
        ca_trust_path=str(other),
    )
    with pytest.raises(requests.exceptions.SSLError):
        session.run_ps("Get-VM")


@pytest.mark.parametrize("encryption", ["never", "always"])
def test_ntlm_with_and_without_message_encryption(double: WinRMDouble, encryption: str) -> None:
    session = winrm.Session(
        double.endpoint,
        auth=("standby", "p4ss"),
        transport="ntlm",
        message_encryption=encryption,
        server_cert_validation="validate",
        ca_trust_path=str(double.cert),
    )
    r = session.run_ps("Get-VM | ConvertTo-Json")
    assert r.status_code == 0 and json.loads(r.std_out)["script"] == "Get-VM | ConvertTo-Json"
    wrong = winrm.Session(
        double.endpoint,
        auth=("standby", "nope"),
        transport="ntlm",
        message_encryption=encryption,
        ca_trust_path=str(double.cert),
    )
    with pytest.raises(InvalidCredentialsError):
        wrong.run_ps("Get-VM")
