"""The CLI on bad input: one line on stderr, a documented exit code, nothing changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STANDBY = [sys.executable, "-m", "standby.core"]


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STANDBY, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "STANDBY_HOME": str(home)},
    )


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "sites").mkdir()
    return tmp_path


def test_plugins_lists_physical(home: Path) -> None:
    proc = run(home, "plugins", "--json")
    rows = json.loads(proc.stdout)
    assert {(r["name"], r["role"]) for r in rows} >= {
        ("physical", "source"),
        ("physical", "target"),
    }
    assert all(r["ok"] for r in rows if r["name"] == "physical")


def test_unknown_site_and_unknown_vm(home: Path) -> None:
    one_line_error(run(home, "vms", "nowhere"), 3, "unknown site 'nowhere'")
    one_line_error(run(home, "points", "ghost"), 3, "VM 'ghost' is not protected")
    one_line_error(run(home, "replicate", "ghost"), 3, "ghost")
    one_line_error(run(home, "failover", "ghost", "--test"), 3, "ghost")


def test_malformed_and_incomplete_site_files(home: Path) -> None:
    (home / "sites" / "broken.toml").write_text("plugin = [\n")
    one_line_error(run(home, "vms", "broken"), 2, "broken.toml", "not valid TOML")
    (home / "sites" / "broken.toml").unlink()
    (home / "sites" / "nouri.toml").write_text('plugin = "physical"\n')
    one_line_error(run(home, "vms", "nouri"), 2, "nouri.toml", "missing key 'uri'")
    (home / "sites" / "typo.toml").write_text('plugin = "physical"\nuri = "qemu:///x"\nurl = 1\n')
    one_line_error(run(home, "vms", "typo"), 2, "typo.toml", "unknown key 'url'")
    (home / "sites" / "ghostplug.toml").write_text('plugin = "vmwhere"\nuri = "x"\n')
    one_line_error(run(home, "vms", "ghostplug"), 3, "no source plugin 'vmwhere'")


def test_sites_add_refuses_bad_input_and_writes_nothing(home: Path) -> None:
    one_line_error(run(home, "sites", "add", "s1", "--plugin", "nope"), 2, "unknown plugin 'nope'")
    one_line_error(
        run(
            home,
            "sites",
            "add",
            "s1",
            "--plugin",
            "physical",
            "--set",
            'uri="qemu:///system"',
            "--set",
            'password="hunter2"',
        ),
        2,
        "secret reference",
    )
    proc = run(home, "sites", "add", "s1", "--plugin", "physical", "--set", "password=x")
    assert "hunter2" not in proc.stderr
    assert not (home / "sites" / "s1.toml").exists()
    ok = run(
        home,
        "sites",
        "add",
        "s1",
        "--plugin",
        "physical",
        "--set",
        'uri="qemu:///system"',
        "--set",
        'password="env:LIBVIRT_PW"',
    )
    assert ok.returncode == 0, ok.stderr
    listed = json.loads(run(home, "sites", "list", "--json").stdout)
    assert [s["name"] for s in listed] == ["s1"]
    one_line_error(
        run(home, "sites", "add", "s1", "--plugin", "physical", "--set", 'uri="a://"'), 2, "exists"
    )


def test_unreachable_libvirt_uri(home: Path) -> None:
    (home / "sites" / "far.toml").write_text(
        'plugin = "physical"\nuri = "qemu+tcp://127.0.0.1:1/system"\n'
    )
    one_line_error(run(home, "vms", "far"), 7, "cannot connect", "far")


def test_protect_with_bad_policy_values(home: Path) -> None:
    one_line_error(
        run(home, "protect", "x", "--from", "a", "--to", "b", "--rpo", "soon"), 2, "--rpo"
    )
    one_line_error(
        run(home, "protect", "x", "--from", "a", "--to", "b", "--retain", "0"), 2, "retain"
    )
    one_line_error(run(home, "protect", "x", "--from", "a", "--to", "b"), 3, "unknown site 'a'")
    assert json.loads(run(home, "status", "--json").stdout) == []


def test_unprotect_needs_confirmation_and_a_protected_vm(home: Path) -> None:
    one_line_error(run(home, "unprotect", "ghost"), 2, "--yes")
    one_line_error(run(home, "unprotect", "ghost", "--yes"), 3, "VM 'ghost' is not protected")
