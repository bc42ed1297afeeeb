"""The VDDK reader's process and NBD path, with nbdkit's `file` plugin standing in for its
`vddk` plugin (VMware's VDDK cannot be installed here): nbdkit per frozen disk, the password
in a 0600 file that goes with the snapshot, bytes read over NBD."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from doubles.vcsim_proc import Vcsim

from standby.core.model import Consistency, Extent
from standby.plugins.vmware import source as vmware_source
from standby.plugins.vmware.source import VMwareSource
from support.vmware import vmware_site

MiB = 1 << 20


@pytest.fixture
def vddk_source(vcsim: Vcsim, tmp_path: Path) -> Iterator[VMwareSource]:
    src = VMwareSource(vmware_site(vcsim, tmp_path, vddk_libdir="/opt/vmware-vix-disklib"))
    src.connect()
    try:
        yield src
    finally:
        src.close()


def test_disks_are_read_through_nbdkit(
    vddk_source: VMwareSource, vcsim: Vcsim, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    vm = vddk_source.list_vms()[-1]
    files = {d["datastorePath"]: d["file"] for d in vcsim.disks(vm.name)}

    def fake_command(opts: Any, **kw: Any) -> list[str]:
        real = vmware_source.vddk_command.__wrapped__(opts, **kw)  # type: ignore[attr-defined]
        secret = Path(kw["password_file"])
        seen.append(
            {"cmd": real, "mode": stat.S_IMODE(secret.stat().st_mode), "pw": secret.read_text()}
        )
        local = files[str(kw["disk"])]
        return ["nbdkit", "--readonly", "--exit-with-parent", "--unix", kw["socket_path"],
                "file", local]  # fmt: skip

    real = vmware_source.vddk_command
    fake_command.__wrapped__ = real  # type: ignore[attr-defined]
    monkeypatch.setattr(vmware_source, "vddk_command", fake_command)
    key = int(vm.disks[0].name.removeprefix("disk"))
    vcsim.write(vm.name, key, 2 * MiB, b"\x5d" * 65536)
    with vddk_source.open_snapshot(vm, Consistency.CRASH, {d.name: None for d in vm.disks}) as s:
        data = vddk_source.read(s, vm.disks[0].name, Extent(2 * MiB, 65536))
        assert data == b"\x5d" * 65536
        secret = Path(next(a for a in seen[0]["cmd"] if a.startswith("password=+"))[10:])
        assert secret.exists()
    assert not secret.exists() and not secret.parent.exists(), "the password file goes"
    assert seen[0]["mode"] == 0o600 and seen[0]["pw"] == vcsim.password
    cmd = seen[0]["cmd"]
    assert f"snapshot={s.handle.snap._moId}" in cmd
    assert any(a.startswith("thumbprint=") for a in cmd)
    pw = vcsim.password
    assert not any(a == pw or a.endswith(f"={pw}") for a in cmd), "never on a command line"
