"""A planned failover's zero-loss step: shut the source down, final cycle, prove no change."""

from __future__ import annotations

import time

from sqlalchemy import select

from standby.core.config import Policy
from standby.core.engine import Engine
from standby.core.engine.native import is_native
from standby.core.errors import NotFound, TransientError
from standby.core.interfaces import Source
from standby.core.model import Consistency, ProtectionInfo, VMSpec
from standby.core.state import ChangeToken, Protection, protection_info


def final_cycle(engine: Engine, vm_key: str, policy: Policy) -> int:
    """Shut the source VM down, replicate what is left, prove nothing changed since.

    Returns the final point's id. The caller holds the VM's lock."""
    with engine.state.session() as s:
        pinfo = protection_info(engine.state.protection(s, vm_key))
    source = engine.source(pinfo.source_site)
    try:
        vm = source.get_vm(pinfo.vm.id)
    except NotFound as exc:
        raise NotFound(f"{exc}; a planned failover needs the source VM: use --unplanned") from None
    if vm.power_state != "shutoff":
        _shut_down(engine, source, vm, pinfo, policy)
    with engine.state.session() as s:
        engine.state.log(s, "failover", f"{vm.name} is off at '{pinfo.source_site}'", pinfo.id)
    if is_native(policy):  # the platform ships what is left and says so itself
        report = engine.run_cycle(pinfo.id, final=True)
    else:
        report = engine.run_cycle(pinfo.id)
        prove_no_changes(engine, pinfo.id)
    with engine.state.session() as s:
        engine.state.log(
            s,
            "failover",
            f"final point {report.point_id} of {vm.name}: nothing changed after it (zero loss)",
            pinfo.id,
        )
    return report.point_id


def _shut_down(
    engine: Engine, source: Source, vm: VMSpec, pinfo: ProtectionInfo, policy: Policy
) -> None:
    """Ask the guest to shut down; power it off when it has not within the policy's time."""
    engine.progress.start(f"shutting {vm.name} down at '{pinfo.source_site}'", 0)
    source.power_off(vm)
    deadline = time.monotonic() + policy.shutdown_timeout_seconds
    while source.get_vm(vm.id).power_state != "shutoff":
        if time.monotonic() > deadline:
            with engine.state.session() as s:
                engine.state.log(
                    s,
                    "warning",
                    f"{vm.name} did not shut down in {policy.shutdown_timeout_seconds}s; "
                    "powered off",
                    pinfo.id,
                    level="warning",
                )
            source.power_off(vm, force=True)
            break
        time.sleep(0.5)
    engine.progress.finish()


def prove_no_changes(engine: Engine, protection_id: int) -> None:
    """After the final cycle of a stopped VM, the source must report no change since it."""
    with engine.state.session() as s:
        prot = s.get(Protection, protection_id)
        assert prot is not None
        tokens = {
            t.disk: t.token
            for t in s.scalars(select(ChangeToken).where(ChangeToken.protection_id == prot.id))
        }
        pinfo = protection_info(prot)
    source = engine.source(pinfo.source_site)
    vm = source.get_vm(pinfo.vm.id)
    tracked = {d.name: tokens.get(d.name) for d in vm.disks if d.change_tracking}
    if not all(tracked.values()):
        return  # untracked disks were hash-compared in full by the final cycle itself
    with source.open_snapshot(vm, Consistency.CRASH, tracked) as snap:
        changed = {d: sum(e.length for e in source.changed_extents(snap, d)) for d in tracked}
    if any(changed.values()):
        raise TransientError(
            f"VM '{vm.name}' changed after its final point ({changed}); planned failover stopped"
        )
