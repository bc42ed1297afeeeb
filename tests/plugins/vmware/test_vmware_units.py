"""The VMware plugin's pieces that need no vCenter: site keys, pinning, paths, VDDK."""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from doubles.certs import make_cert
from doubles.vcsim_proc import Vcsim

from standby.core.config import Site
from standby.core.errors import ConfigError
from standby.plugins.vmware.conn import VMwareOptions, probe
from standby.plugins.vmware.reader import DatastorePath, vddk_command
from support.vmware import vmware_site

BASE = {"host": "127.0.0.1", "user": "u", "password": "env:X", "datacenter": "DC0"}


def opts(**extra: object) -> VMwareOptions:
    site = Site(name="vc", plugin="vmware", path=Path("sites/vc.toml"), raw={**BASE, **extra})
    return site.options(VMwareOptions)


def test_site_keys_are_checked_with_one_line_errors() -> None:
    assert opts(thumbprint="AB:" * 31 + "AB").thumbprint == "ab" * 32
    for bad, word in (
        ({"password": "hunter2"}, "password"),
        ({"thumbprint": "AB:CD"}, "thumbprint"),
        ({"verify": False}, "verify"),
        ({"port": 0}, "port"),
    ):
        with pytest.raises(ConfigError) as err:
            opts(**bad)
        assert word in str(err.value) and "\n" not in str(err.value)
        assert "hunter2" not in str(err.value)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, str, Path]]:
    """A TLS listener with a self-signed certificate: (port, its SHA-256, the cert file)."""
    cert, key = make_cert(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = socket.create_server(("127.0.0.1", 0))
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield srv.getsockname()[1], hashlib.sha256(der).hexdigest(), cert
    finally:
        srv.close()


def test_a_wrong_thumbprint_is_refused_naming_expected_and_seen(
    tls_server: tuple[int, str, Path],
) -> None:
    port, sha, cert = tls_server
    probe(opts(port=port, thumbprint=sha))  # the pinned one passes
    probe(opts(port=port, ca_file=str(cert)))  # so does the CA file
    wrong = "00" * 32
    with pytest.raises(ConfigError) as err:
        probe(opts(port=port, thumbprint=wrong))
    msg = str(err.value)
    assert "00:00:00" in msg and sha[:8].upper() in msg.replace(":", "") and "\n" not in msg
    with pytest.raises(ConfigError, match="not trusted"):
        probe(opts(port=port))  # no pin, no CA file: verification is never off


def test_datastore_paths() -> None:
    p = DatastorePath.parse("[datastore 1] web01/web01.vmdk")
    assert (p.datastore, p.path) == ("datastore 1", "web01/web01.vmdk")
    assert str(p.flat()) == "[datastore 1] web01/web01-flat.vmdk"
    assert p.flat().flat() == p.flat()
    with pytest.raises(Exception, match="not a datastore path"):
        DatastorePath.parse("web01.vmdk")


def test_the_vddk_command_keeps_the_password_off_the_command_line() -> None:
    o = opts(vddk_libdir="/opt/vmware-vix-disklib-distrib")
    cmd = vddk_command(
        o,
        socket_path="/run/x.sock",
        vm_moref="vm-42",
        snapshot_moref="snapshot-7",
        disk=DatastorePath.parse("[ds1] web01/web01.vmdk"),
        password_file="/run/pw",
        sha1_thumbprint="AA:BB",
    )
    assert cmd[:2] == ["nbdkit", "--readonly"] and "vddk" in cmd
    assert "password=+/run/pw" in cmd and "file=[ds1] web01/web01.vmdk" in cmd
    assert "vm=moref=vm-42" in cmd and "snapshot=snapshot-7" in cmd
    assert not any("env:X" in a for a in cmd)
    with pytest.raises(Exception, match="vddk_libdir"):
        vddk_command(
            opts(),
            socket_path="s",
            vm_moref="v",
            snapshot_moref="s",
            disk=DatastorePath.parse("[d] x.vmdk"),
            password_file="p",
            sha1_thumbprint="t",
        )


def test_multipart_byteranges_are_split_by_their_content_range() -> None:
    from standby.plugins.vmware.reader import _byteranges

    data = b"--B--\r\n\r\nxx"  # a part's data may hold the boundary and a blank line
    body = (
        b"\r\n--B\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-10/100\r\n"
        b"\r\n" + data + b"\r\n--B\r\nContent-Range: bytes 50-51/100\r\n\r\nyy\r\n--B--\r\n"
    )
    assert _byteranges("multipart/byteranges; boundary=B", body) == {0: data, 50: b"yy"}
    assert _byteranges("application/octet-stream", body) is None
    assert _byteranges("multipart/byteranges; boundary=B", b"--B\r\nno range\r\n\r\n") is None


def test_a_batch_of_blocks_is_one_multi_range_get_on_the_double(
    vcsim: Vcsim, tmp_path: Path
) -> None:
    from standby.plugins.vmware.source import VMwareSource

    src = VMwareSource(vmware_site(vcsim, tmp_path))
    src.connect()
    try:
        vm = src.list_vms()[0]
        vcsim.write(vm.name, 2000, 3 << 20, bytes(range(256)) * 256)
        where = DatastorePath.parse(vm.extra["disk2000.file"]).flat()
        assert src.reader is not None
        ranges = [(3 << 20, 4096), ((3 << 20) + 8192, 512), (0, 512)]
        got = src.reader.read_ranges(where, ranges)
        assert src.reader._multi is True, "the double answers multi-range GETs"
        assert got == [src.reader.read(where, o, n) for o, n in ranges]
    finally:
        src.close()
