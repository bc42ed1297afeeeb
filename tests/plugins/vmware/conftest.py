"""One vcsim double per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from doubles.vcsim_proc import Vcsim, start_vcsim


@pytest.fixture(scope="module")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    sim = start_vcsim(tmp_path_factory.mktemp("vcsim"), vms=2)
    try:
        yield sim
    finally:
        sim.stop()
