"""Retention: keep the newest `retain` points, drop any older than `retain_age`.

The newest point is never dropped, and nothing is pruned while a failover of the VM runs
(a test failover's disks are overlays on the chain). Points go visible -> pruning -> pruned;
a `pruning` point is invisible and is pruned again by the next run if a kill interrupted
the target's work.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from standby.core.config import Policy
from standby.core.errors import NotFound
from standby.core.state import (
    ACTIVE,
    Protection,
    RecoveryPoint,
    aware,
    failovers,
    point_info,
    protection_info,
)

from .context import Context


def prune(ctx: Context, vm_key: str | int) -> list[int]:
    """Apply the policy's retention; points used by a running failover are kept. `vm_key`: a
    VM name or id, or the protection's own id (an int: a re-protected VM may run under
    another name at its new source, e.g. one Azure made valid)."""
    with ctx.state.session() as s:
        if isinstance(vm_key, int):
            prot = s.get(Protection, vm_key)
            if prot is None:
                raise NotFound(f"protection {vm_key} is gone")
        else:
            prot = ctx.state.protection(s, vm_key)
        active = failovers(s, prot.id, ACTIVE)
        policy = Policy.model_validate(prot.policy)
        points = [p for p in prot.points if p.state in ("visible", "pruning")]
        visible = [p for p in points if p.state == "visible"]
        now = datetime.now(UTC)
        drop_ids = {p.id for p in points if p.state == "pruning"}
        if not active:
            keep_n = visible[-policy.retain_count :]
            max_age = timedelta(seconds=policy.retain_age_seconds)
            for p in visible[:-1]:
                if p not in keep_n or now - aware(p.created_at) > max_age:
                    drop_ids.add(p.id)
        if not drop_ids:
            return []
        for p in points:
            if p.id in drop_ids:
                p.state = "pruning"
        drop = [point_info(p) for p in points if p.id in drop_ids]
        keep = [point_info(p) for p in points if p.id not in drop_ids]
        pinfo = protection_info(prot)
    moved = ctx.target(pinfo.target_site).prune(pinfo, drop, keep)
    with ctx.state.session() as s:
        for p_id in drop_ids:
            dropped = s.get(RecoveryPoint, p_id)
            assert dropped is not None
            dropped.state = "pruned"
        for p_id, ref in moved.items():
            kept = s.get(RecoveryPoint, p_id)
            assert kept is not None
            kept.ref = ref
        ctx.state.log(s, "prune", f"pruned points {sorted(drop_ids)}", pinfo.id)
    return sorted(drop_ids)
