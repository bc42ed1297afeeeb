"""Fixtures the flow modules share: a vcsim double added to the module's lab as site `vc`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from doubles.vcsim_proc import Vcsim, start_vcsim

from support.labenv import Lab
from support.vmware import write_vc_site


@pytest.fixture(scope="module")
def vc(labenv: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    sim = start_vcsim(tmp_path_factory.mktemp("vcsim"), vms=3)
    write_vc_site(labenv.home, sim)
    try:
        yield sim
    finally:
        labenv.release()
        sim.stop()
