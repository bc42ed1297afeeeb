"""The vault target passes the target contract kit (test failover through a KVM run_on site),
and the vault's parts hold their rules: keys, sealing, maps, sweeps."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from standby.core.config import get_site
from standby.core.errors import AuthError, IntegrityError
from standby.core.model import DiskSpec, Extent, NicSpec, PointInfo, ProtectionInfo, VMSpec
from standby.core.testing import TargetContract
from standby.core.vault import gc
from standby.core.vault.crypto import KeyFile, Sealer, tune
from standby.core.vault.maps import DiskMap
from standby.core.vault.store import LocalStore
from standby.core.vault.target import VaultTarget, assemble
from standby.core.vault.vault import Vault
from support.labenv import Lab, MiB, write_site

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def kit(labenv: Lab) -> Iterator[VaultTarget]:
    os.environ["SB_KIT_PASS"] = "kit pass"
    labenv.cli("vault", "create", "kit", "--store", f"file://{labenv.base}/kit",
               "--passphrase", "env:SB_KIT_PASS", check=True)  # fmt: skip
    write_site(labenv.home, "kitv", 'plugin = "vault"\nvault = "kit"\nrun_on = "dr"\n')
    t = VaultTarget(get_site("kitv", labenv.home))
    t.connect()
    try:
        yield t
    finally:
        t.close()


class TestVaultTarget(TargetContract):
    @pytest.fixture
    def target(self, kit: VaultTarget) -> VaultTarget:
        return kit

    @pytest.fixture
    def contract_protection(self) -> ProtectionInfo:
        vm = VMSpec(id="kit-1", name="kitvm", cpus=1, memory_mib=64,
                    disks=(DiskSpec(name="vda", size=8 * MiB, format="qcow2"),),
                    nics=(NicSpec(name="nic0", mac="52:54:00:00:00:98"),))  # fmt: skip
        return ProtectionInfo(id=43, vm=vm, source_site="src", target_site="kitv")

    @pytest.fixture
    def read_point(self, kit: VaultTarget) -> Callable[..., bytes]:
        def read(p: ProtectionInfo, point: PointInfo, disk: str, offset: int, n: int) -> bytes:
            rec = kit.point_record(p, int(point.ref["point"]))
            m = gc.point_maps(kit.vault, rec)[disk]
            ext = Extent(offset, n)
            return bytes(assemble(ext, list(m.pieces(offset, offset + n)), kit.vault.read_chunk))

        return read


def test_the_key_needs_its_passphrase_and_the_kdf_is_slow_enough() -> None:
    start = time.perf_counter()
    params = tune()
    kf = KeyFile.wrap(KEY, "vid", "v", "right", params)
    assert kf.unwrap("right") == KEY and time.perf_counter() - start >= 0.5
    assert params.memory_kib >= 64 * 1024
    with pytest.raises(AuthError, match="wrong passphrase for vault 'v'"):
        kf.unwrap("wrong")
    again = KeyFile.from_json(kf.rewrapped("right", "other").to_json(), "f")
    assert again.unwrap("other") == KEY


def test_a_record_cannot_be_moved_or_changed() -> None:
    s = Sealer(KEY)
    blob = s.seal("points", "a/1", b"index")
    assert s.open("points", "a/1", blob, "x") == b"index"
    with pytest.raises(IntegrityError, match="points/a/2: failed authentication"):
        s.open("points", "a/2", blob, "points/a/2")
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(IntegrityError):
        s.open("points", "a/1", bytes(bad), "p")
    assert s.chunk_id(b"x") != Sealer(bytes(32)).chunk_id(b"x"), "ids depend on the key"


def test_a_disk_map_keeps_the_newest_bytes() -> None:
    m = DiskMap(4 * MiB, MiB)
    m.set(0, MiB, b"A" * 32)
    m.set(4096, 8192, b"B" * 32)
    m.clear(MiB - 4096, MiB)
    got = list(m.pieces(0, MiB))
    assert got == [(0, 4096, b"A" * 32, 0), (4096, 8192, b"B" * 32, 0),
                   (8192, MiB - 4096, b"A" * 32, 8192)]  # fmt: skip
    back = DiskMap.from_bytes(4 * MiB, MiB, m.to_bytes())
    assert list(back.all_pieces()) == list(m.all_pieces())


def test_a_sweep_frees_only_what_no_point_reaches(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    vid = Vault.create(store, "g", KEY)
    v = Vault.open("g", store, KEY, vid)
    live, dead = b"L" * 4096, b"D" * 4096
    rows, data = [], bytearray()
    for chunk in (live, dead):
        cid = v.sealer.chunk_id(chunk)
        blob = v.encode(cid, chunk, 3)
        rows.append((cid, len(data), len(blob)))
        data += blob
    v.put_pack("p1", bytes(data), rows)
    m = DiskMap(MiB, MiB)
    m.set(0, 4096, rows[0][0])
    from standby.core.vault.target import encode_maps

    v.put_record("points", "vm/0000000001", {"disks": encode_maps({"vda": m})})
    store.put("packs/zz/orphan", b"half a pack")  # a writer killed between its two puts
    rep = gc.sweep(v)
    assert rep.chunks_freed == 1 and rep.packs_rewritten == 1
    assert not store.list("packs/zz/")
    v.load_index(force=True)
    assert v.read_chunk(rows[0][0]) == live and rows[1][0] not in v.index
    assert gc.check(v, read_data=True).ok
