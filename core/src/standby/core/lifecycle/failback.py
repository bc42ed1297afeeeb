"""Failback: a planned failover back to the VM's home site, once re-protect caught up."""

from __future__ import annotations

from standby.core.engine import Engine
from standby.core.errors import ConfigError
from standby.core.state import Failover, latest_point

from .commit import active_real
from .failover import failover


def failback(engine: Engine, vm_key: str, run_id: int | None = None) -> Failover:
    """A planned failover back to the VM's home site (after re-protect has caught up)."""
    with engine.state.session() as s:
        prot = engine.state.protection(s, vm_key)
        home = prot.home_site
        if home is None or prot.target_site != home:
            raise ConfigError(
                f"VM '{prot.vm_name}' is not re-protected towards its home site; fail over, "
                f"commit and `standby reprotect {prot.vm_name}` first"
            )
        if prot.state == "failed-over" and run_id is not None:
            fo = active_real(s, prot)
            if fo.run_id == run_id:
                return fo
        if latest_point(s, prot.id) is None:
            raise ConfigError(
                f"re-protect of '{prot.vm_name}' has not caught up: no recovery point at "
                f"'{home}' yet; run `standby replicate {prot.vm_name}`"
            )
    return failover(engine, vm_key, "planned", run_id=run_id)
