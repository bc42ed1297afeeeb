"""A vault's round trip through any store (records, a pack, a chunk, a wrong key)."""

from __future__ import annotations

import os

import pytest

from standby.core.errors import AuthError
from standby.core.vault.store import Store
from standby.core.vault.vault import Vault


def vault_round_trip(store: Store) -> None:
    key = os.urandom(32)
    vid = Vault.create(store, "t", key)
    v = Vault.open("t", store, key, vid)
    v.put_record("points", "a/1", {"x": 1})
    assert v.get_record("points", "a/1") == {"x": 1}
    data = os.urandom(5000) + bytes(20000)
    cid = v.sealer.chunk_id(data)
    blob = v.encode(cid, data, 3)
    v.put_pack("p1", blob, [(cid, 0, len(blob))])
    v.load_index(force=True)
    assert v.read_chunk(cid) == data
    with pytest.raises(AuthError):
        Vault.open("t", store, os.urandom(32))
