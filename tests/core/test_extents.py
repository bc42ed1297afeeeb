"""Interval arithmetic and manifests."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from standby.core.extents import (
    BLOCK,
    UNKNOWN_DIGEST,
    ZERO_DIGEST,
    Manifest,
    align_out,
    block_digest,
    normalize,
    pack,
    split,
    subtract,
    total,
    union,
    unpack,
)

ranges = st.lists(
    st.tuples(st.integers(0, 1000), st.integers(0, 1000)).map(lambda t: (min(t), max(t))),
    max_size=20,
)


def as_set(r: list[tuple[int, int]]) -> set[int]:
    return {i for s, e in r for i in range(s, e)}


@given(ranges, ranges)
def test_union_and_subtract_match_set_semantics(
    a: list[tuple[int, int]], b: list[tuple[int, int]]
) -> None:
    na, nb = normalize(a), normalize(b)
    assert as_set(union(na, nb)) == as_set(na) | as_set(nb)
    assert as_set(subtract(na, nb)) == as_set(na) - as_set(nb)
    out = subtract(na, nb)
    assert out == normalize(out)


@given(ranges)
def test_pack_roundtrip_and_split(a: list[tuple[int, int]]) -> None:
    n = normalize(a)
    assert unpack(pack(n)) == n
    pieces = split(n, 64)
    assert as_set(pieces) == as_set(n) and all(e - s <= 64 for s, e in pieces)
    assert total(n) == len(as_set(n))


def test_align_out_widens_to_blocks_and_clamps() -> None:
    size = 3 * BLOCK + 100
    assert align_out([(10, 20)], size) == [(0, BLOCK)]
    assert align_out([(3 * BLOCK + 5, 3 * BLOCK + 6)], size) == [(3 * BLOCK, size)]
    assert align_out([(0, 1), (BLOCK - 1, BLOCK + 1)], size) == [(0, 2 * BLOCK)]


def test_block_digest_zero_and_data() -> None:
    assert block_digest(bytes(BLOCK)) == ZERO_DIGEST
    assert block_digest(bytes(100)) == ZERO_DIGEST
    data = random.Random(1).randbytes(BLOCK)
    assert block_digest(data) not in (ZERO_DIGEST, UNKNOWN_DIGEST)
    assert block_digest(data) == block_digest(bytearray(data))


def test_manifest_resize_invalidate_nonzero_and_blob() -> None:
    m = Manifest(2 * BLOCK)
    assert m.nonzero() == []
    m.set(1, b"\x01" * 16)
    m.resize(4 * BLOCK + 1)
    assert m.get(4) == ZERO_DIGEST and m.nonzero() == [(BLOCK, 2 * BLOCK)]
    assert not m.has_unknown()
    m.set(0, b"\x00" + b"\xff" * 15)
    m.set(1, b"\xff" * 8 + b"\x00" * 8)  # 0xff runs across a boundary are not "unknown"
    assert not m.has_unknown()
    m.invalidate([(3 * BLOCK, 3 * BLOCK + 1)])
    assert m.get(3) == UNKNOWN_DIGEST and m.has_unknown()
    again = Manifest.from_blob(m.size, m.to_blob())
    assert again.data == m.data and again.digest() == m.digest()
