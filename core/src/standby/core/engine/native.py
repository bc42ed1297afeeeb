"""Protections whose bytes a platform's own replication moves (policy `replication`, e.g.
`"hyperv-replica"`): standby enables it at protect, and each cycle asks the platform for its
state and recovery points, recording each new one as a point of the protection (and marking
those the platform no longer holds as pruned). No manifests: the platform verifies its own
copies; a point's ref names the platform's recovery point.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from standby.core.config import Policy
from standby.core.errors import CapabilityNotSupported, TransientError
from standby.core.extents import BLOCK, Manifest
from standby.core.interfaces import NativeReplication, NativeState, Target
from standby.core.model import ProtectionInfo
from standby.core.state import Cycle, PointDisk, Protection, RecoveryPoint, aware, protection_info

from .context import Context
from .report import CycleReport


def is_native(policy: Policy | dict[str, object]) -> bool:
    raw = policy.replication if isinstance(policy, Policy) else policy.get("replication")
    return str(raw or "standby") != "standby"


def replication_of(target: Target, policy: Policy, site: str) -> NativeReplication:
    """The target's orchestration of `policy.replication`; one line when it has none."""
    native = target.native(policy.replication)
    if native is None:
        raise CapabilityNotSupported(
            f"site '{site}' (plugin {target.plugin_name}) cannot run replication "
            f"'{policy.replication}'"
        )
    return native


def _key(ref: dict[str, object]) -> str:
    return json.dumps(ref, sort_keys=True)


def cycle(ctx: Context, protection_id: int, final: bool = False) -> CycleReport:
    """One native cycle: the platform's state and points, recorded."""
    started = time.monotonic()
    with ctx.state.session() as s:
        prot = s.get(Protection, protection_id)
        assert prot is not None
        policy = Policy.model_validate(prot.policy)
        pinfo = protection_info(prot)
    source, target = ctx.source(pinfo.source_site), ctx.target(pinfo.target_site)
    state = replication_of(target, policy, pinfo.target_site).sync(pinfo, source, final)
    now = datetime.now(UTC)
    with ctx.state.session() as s:
        prot = s.get(Protection, protection_id)
        assert prot is not None
        prot.health = "ok" if state.healthy else "native-error"
        prot.health_reason = "" if state.healthy else state.reason
        if not state.healthy:
            ctx.state.log(
                s, "warning", f"{pinfo.vm.name}: {state.reason}", pinfo.id, level="warning"
            )
        run = Cycle(
            protection_id=prot.id, status="complete", phase="done", kind="native",
            snapshot_at=now, finished_at=now,
        )  # fmt: skip
        s.add(run)
        s.flush()
        newest = _record(ctx, s, prot, pinfo, policy, state, run.id)
        if newest is None:
            why = state.reason if not state.healthy else f"no recovery point yet ({state.state})"
            raise TransientError(f"VM '{pinfo.vm.name}': {policy.replication}: {why}")
        run.rpo_seconds = (now - aware(newest.created_at)).total_seconds()
        return CycleReport(
            vm=pinfo.vm.name, cycle_id=run.id, point_id=newest.id, kind="native",
            consistency=newest.consistency, resumed=False, bytes_planned=0, bytes_read=0,
            bytes_written=0, bytes_zeroed=0, seconds=round(time.monotonic() - started, 3),
            rpo_seconds=run.rpo_seconds, notes=[f"{policy.replication}: {state.state}"],
        )  # fmt: skip


def _record(
    ctx: Context,
    s: Session,
    prot: Protection,
    pinfo: ProtectionInfo,
    policy: Policy,
    state: NativeState,
    cycle_id: int,
) -> RecoveryPoint | None:
    """Points the platform lists that standby has not recorded yet are added; recorded ones it
    no longer lists are pruned. Returns the newest point."""
    known = {_key(p.ref): p for p in prot.points if p.state == "visible"}
    listed = {_key(np.ref) for np in state.points}
    for key, p in known.items():
        if key not in listed:
            p.state = "pruned"  # the platform's history no longer holds it
    newest: RecoveryPoint | None = None
    for np in state.points:
        if _key(np.ref) in known:
            newest = known[_key(np.ref)]
            continue
        newest = RecoveryPoint(
            protection_id=prot.id, cycle_id=cycle_id, created_at=np.taken_at,
            consistency=np.consistency.value, ref=np.ref,
            notes=f"{policy.replication}: {state.state}",
        )  # fmt: skip
        s.add(newest)
        s.flush()
        for disk in pinfo.vm.disks:  # sizes for failover; the content is the platform's
            m = Manifest(disk.size)
            m.invalidate([(0, disk.size)])
            s.add(
                PointDisk(
                    point_id=newest.id, disk=disk.name, size=disk.size, block_size=BLOCK,
                    manifest=m.to_blob(), digest=m.digest(),
                )
            )  # fmt: skip
        what = f"{pinfo.vm.name}: recovery point {newest.id} ({policy.replication})"
        ctx.state.log(s, "point", what, pinfo.id, cycle=cycle_id, point=newest.id)
    return newest
