"""Azure doubles shared by the provider's tests (one Azurite + fake ARM per module)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.azure import AzureEnv, azure_doubles


@pytest.fixture(scope="module")
def azenv() -> Iterator[AzureEnv]:
    with azure_doubles() as env:
        yield env
