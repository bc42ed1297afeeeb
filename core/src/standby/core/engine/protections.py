"""Protections: protect (validate against the target, record), unprotect, usage and cost."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.core.config import Policy
from standby.core.errors import CapabilityNotSupported, ConfigError, NotFound
from standby.core.extents import Manifest, total
from standby.core.model import CostEstimate, Usage
from standby.core.state import (
    UNCLEANED,
    ChangeToken,
    Cycle,
    CycleDisk,
    Failover,
    Protection,
    SiteRecord,
    failovers,
    point_info,
    protection_info,
)

from . import native
from .context import Context


def protect(ctx: Context, vm_key: str, source_site: str, target_site: str, policy: Policy) -> int:
    """Validate the VM against the target and record the protection (no data moves yet)."""
    for name in (source_site, target_site):
        ctx.site(name)
    with ctx.state.session() as s:
        exists = s.scalars(
            select(Protection).where((Protection.vm_name == vm_key) | (Protection.vm_id == vm_key))
        ).first()
        if exists:
            raise ConfigError(
                f"VM '{vm_key}' is already protected ({exists.source_site} -> {exists.target_site})"
            )
    source = ctx.source(source_site)
    target = ctx.target(target_site)
    vm = source.get_vm(vm_key)
    with ctx.lock(vm.name, "protection"):
        verdict = target.validate(vm)
        if not verdict.ok:
            raise CapabilityNotSupported(
                f"VM '{vm.name}' cannot be protected to '{target_site}': "
                + "; ".join(verdict.problems)
            )
        with ctx.state.session() as s:
            for site_name in (source_site, target_site):
                if s.get(SiteRecord, site_name) is None:
                    s.add(SiteRecord(name=site_name, plugin=ctx.site(site_name).plugin))
            prot = Protection(
                vm_id=vm.id,
                vm_name=vm.name,
                source_site=source_site,
                target_site=target_site,
                policy=policy.model_dump(),
                spec=vm.to_dict(),
                target_size=verdict.size,
            )
            s.add(prot)
            s.flush()
            target.prepare(protection_info(prot, vm))
            if native.is_native(policy):  # in this transaction: a failure records nothing
                replication = native.replication_of(target, policy, target_site)
                replication.enable(
                    protection_info(prot, vm), source, policy.retain_count, policy.rpo_seconds
                )
            ctx.state.log(
                s,
                "protect",
                f"protected {vm.name} from {source_site} to {target_site}",
                prot.id,
                notes=verdict.notes,
            )
            return prot.id


def protect_all(
    ctx: Context, source_site: str, target_site: str, policy: Policy
) -> list[tuple[str, int | None, str]]:
    """Protect every VM the source site lists (a VMM cloud, a host) that is not protected
    yet: (vm, protection id or None, what happened) per VM. A VM the target refuses is
    reported and the others go on; nothing is recorded for it."""
    out: list[tuple[str, int | None, str]] = []
    with ctx.state.session() as s:
        known = {p.vm_id for p in s.scalars(select(Protection))}
    for vm in ctx.source(source_site).list_vms():
        if vm.id in known:
            out.append((vm.name, None, "already protected"))
            continue
        try:
            pid = protect(ctx, vm.id, source_site, target_site, policy)
        except (CapabilityNotSupported, ConfigError) as exc:
            out.append((vm.name, None, str(exc)))
            continue
        out.append((vm.name, pid, "protected"))
    return out


def unprotect(ctx: Context, vm_key: str, keep_replicas: bool = False) -> int:
    """Stop protecting a VM: drop its replicas and points at the target (unless kept), its
    change tracking at the source, and its state. Refused while a test failover runs."""
    with ctx.state.session() as s:
        prot = ctx.state.protection(s, vm_key)
    with ctx.lock(prot, "unprotect"):
        with ctx.state.session() as s:
            prot = ctx.state.protection(s, vm_key)
            if failovers(s, prot.id, UNCLEANED):
                raise ConfigError(
                    f"VM '{prot.vm_name}' has a test failover; run "
                    f"`standby failover cleanup {prot.vm_name}` first"
                )
            pinfo = protection_info(prot)
            policy = Policy.model_validate(prot.policy)
            points = [point_info(p) for p in prot.points if p.state != "pruned"]
        if native.is_native(policy):
            native.replication_of(ctx.target(pinfo.target_site), policy, pinfo.target_site).disable(
                pinfo, ctx.source(pinfo.source_site)
            )
        if not keep_replicas:
            ctx.target(pinfo.target_site).remove(pinfo, points)
        try:
            source = ctx.source(pinfo.source_site)
            source.release_tokens(source.get_vm(pinfo.vm.id), {})
        except NotFound:
            pass  # the VM is gone; so is its change tracking
        with ctx.state.session() as s:
            _forget(s, pinfo.id)
            ctx.state.log(
                s,
                "unprotect",
                f"{pinfo.vm.name} unprotected ({len(points)} point(s) "
                f"{'kept at' if keep_replicas else 'removed from'} {pinfo.target_site})",
            )
        return len(points)


def _forget(s: Session, protection_id: int) -> None:
    """Delete a protection's rows, children first."""
    gone = s.get(Protection, protection_id)
    assert gone is not None
    cycles = s.scalars(select(Cycle).where(Cycle.protection_id == gone.id)).all()
    for c in cycles:
        for row in s.scalars(select(CycleDisk).where(CycleDisk.cycle_id == c.id)):
            s.delete(row)
    for t in s.scalars(select(ChangeToken).where(ChangeToken.protection_id == gone.id)):
        s.delete(t)
    for f in s.scalars(select(Failover).where(Failover.protection_id == gone.id)):
        s.delete(f)
    for p in gone.points:
        for d in p.disks:
            s.delete(d)
        s.delete(p)
    s.flush()
    for c in cycles:
        s.delete(c)
    s.delete(gone)


def usage(
    ctx: Context, vm_key: str | None = None, site: str | None = None
) -> dict[str, list[Usage]]:
    """Per target site, what each protection holds there (from the engine's records)."""
    out: dict[str, list[Usage]] = {}
    with ctx.state.session() as s:
        if vm_key is not None:
            prots = [ctx.state.protection(s, vm_key)]
        else:
            prots = list(s.scalars(select(Protection).order_by(Protection.id)))
            if site is not None:
                ctx.site(site)
                prots = [p for p in prots if p.target_site == site]
        for prot in prots:
            visible = sorted((p for p in prot.points if p.state == "visible"), key=lambda p: p.id)
            replica = 0
            if visible:
                for d in visible[-1].disks:
                    replica += total(Manifest.from_blob(d.size, d.manifest).nonzero())
            later = [s.get(Cycle, p.cycle_id) for p in visible[1:]]
            changed = sum(c.bytes_written + c.bytes_zeroed for c in later if c is not None)
            out.setdefault(prot.target_site, []).append(
                Usage(protection_info(prot), replica, changed, len(visible), prot.target_size)
            )
    return out


def cost(ctx: Context, vm_key: str | None = None, site: str | None = None) -> list[CostEstimate]:
    """Cost estimates per target site (storage now, compute after failover)."""
    return [
        ctx.target(name).estimate_cost(found) for name, found in usage(ctx, vm_key, site).items()
    ]
