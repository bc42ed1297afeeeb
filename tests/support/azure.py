"""The Azure doubles for tests: Azurite over HTTPS and the fake ARM, with one pinned cert."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doubles.azure_arm import FakeArm
from doubles.azurite_proc import Azurite, start_azurite
from doubles.certs import make_cert

from support.tomlfmt import value as _toml

SUBSCRIPTION = "00000000-0000-0000-0000-0000000000aa"
RESOURCE_GROUP = "standby-dr"
KEY_ENV = "STANDBY_TEST_AZURE_KEY"
SECRET_ENV = "STANDBY_TEST_AZURE_SECRET"
TENANT, CLIENT, SECRET = "test-tenant", "standby-app", "s3cret-for-the-fake"


@dataclass
class AzureEnv:
    """Running Azurite + fake ARM, and how a site file reaches them."""

    base: Path
    cert: Path
    key: Path
    azurite: Azurite
    arm: FakeArm

    def site_raw(self, container: str, **extra: Any) -> dict[str, Any]:
        """The keys of an Azure site file pointing at the doubles."""
        raw: dict[str, Any] = {
            "subscription_id": SUBSCRIPTION,
            "resource_group": RESOURCE_GROUP,
            "location": "westeurope",
            "blob_endpoint": self.azurite.endpoint,
            "container": container,
            "storage_key": f"env:{KEY_ENV}",
            "arm_endpoint": self.arm.url,
            "ca_file": str(self.cert),
            "credential": {
                "kind": "client_secret",
                "tenant_id": TENANT,
                "client_id": CLIENT,
                "client_secret": f"env:{SECRET_ENV}",
                "authority": self.arm.url,
            },
            "network": {"vnet": "dr-vnet", "subnet": "default"},
        }
        raw.update(extra)
        return raw

    def restart_azurite(self) -> None:
        """Start Azurite again after a stop, on the same port with the same blobs on disk."""
        self.azurite = start_azurite(
            self.base / "azurite", self.cert, self.key, self.base / "blobs", port=self.azurite.port
        )

    def make_dr_network(self) -> None:
        """The DR virtual network the site file maps real failovers into (`dr-vnet/default`),
        as an operator would have made it beforehand (idempotent)."""
        from azure.mgmt.network import NetworkManagementClient

        from standby.providers.azure.conn import StaticToken

        client = NetworkManagementClient(
            StaticToken("fake-arm-accepts-any-bearer-token"),
            SUBSCRIPTION,
            base_url=self.arm.url,
            connection_verify=str(self.cert),
            polling_interval=0,
        )
        body: Any = {
            "location": "westeurope",
            "properties": {
                "addressSpace": {"addressPrefixes": ["10.1.0.0/16"]},
                "subnets": [{"name": "default", "properties": {"addressPrefix": "10.1.0.0/24"}}],
            },
        }
        client.virtual_networks.begin_create_or_update(RESOURCE_GROUP, "dr-vnet", body).result()
        client.close()

    def site_toml(self, container: str, **extra: Any) -> str:
        raw = self.site_raw(container, **extra)
        cred = raw.pop("credential")
        net = raw.pop("network")
        lines = ['plugin = "azure"']
        lines += [f"{k} = {_toml(v)}" for k, v in raw.items()]
        lines.append(
            f"network = {{ vnet = {_toml(net['vnet'])}, subnet = {_toml(net['subnet'])} }}"
        )
        lines.append("[credential]")
        lines += [f"{k} = {_toml(v)}" for k, v in cred.items()]
        return "\n".join(lines) + "\n"


@contextmanager
def azure_doubles(persist: bool = False, base: Path | None = None) -> Iterator[AzureEnv]:
    """Start Azurite (HTTPS) and the fake ARM with a cert made now; stop both at the end.

    With `base`, everything lives there and is kept afterwards; else in a temporary directory.
    """
    keep = base is not None
    base = base or Path(tempfile.mkdtemp(prefix="sbaz", dir="/tmp"))
    cert, key = make_cert(base / "tls")
    az = start_azurite(base / "azurite", cert, key, base / "blobs" if persist else None)
    arm = FakeArm(az.account, az.key, cert, base / "tls", resource_groups=(RESOURCE_GROUP,))
    arm.add_app(TENANT, CLIENT, SECRET)
    arm.vhd_alignment = 1 << 20  # real Azure: the VHD's data size is a whole number of MiB
    arm.start()
    old = {k: os.environ.get(k) for k in (KEY_ENV, SECRET_ENV)}
    os.environ[KEY_ENV] = az.key
    os.environ[SECRET_ENV] = SECRET
    env = AzureEnv(base, cert, key, az, arm)
    try:
        yield env
    finally:
        arm.stop()
        env.azurite.stop()  # the one running now (a test may have restarted it)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
