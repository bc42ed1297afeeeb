"""Re-protect: replicate a failed-over (committed) VM back towards the site it came from.

The direction swaps (generation + 1, older points retire). Where the target can, the new
replica is seeded from the VM's original disks there: a `seed` point, known block by block
after a planned failover (the final point's manifest), unknown after an unplanned one (the
engine then reads the seed back and hashes it before deciding what to ship).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.core import plugins
from standby.core.config import Policy
from standby.core.engine import Engine
from standby.core.engine.native import is_native, replication_of
from standby.core.errors import CapabilityNotSupported, ConfigError
from standby.core.extents import BLOCK, Manifest
from standby.core.model import ProtectionInfo, Validation, VMSpec
from standby.core.state import (
    ChangeToken,
    Cycle,
    PointDisk,
    Protection,
    RecoveryPoint,
    protection_info,
)

from .commit import active_real


def reprotect(engine: Engine, vm_key: str) -> Protection:
    """Replicate the failed-over VM back to the site it came from, seeded from the disks there."""
    with engine.state.session() as s:
        prot = engine.state.protection(s, vm_key)
    with engine.lock(prot, "reprotect"):
        with engine.state.session() as s:
            prot = engine.state.protection(s, vm_key)
            if prot.state == "protected":
                return prot  # already re-protected (idempotent for resumed runs)
            if prot.state == "failed-over":
                raise ConfigError(
                    f"commit the failover of '{prot.vm_name}' first: `standby commit "
                    f"{prot.vm_name}`"
                )
            fo = active_real(s, prot)
            old = protection_info(prot)
            fo_kind, fo_vm, used_id = fo.kind, fo.vm_name, fo.point_id
            policy = Policy.model_validate(prot.policy)
        new_source, new_target = old.target_site, old.source_site
        _check_roles(engine, old.vm.name, new_source, new_target)
        vm = engine.source(new_source).get_vm(fo_vm)
        target = engine.target(new_target)
        verdict = target.validate(vm)
        if not verdict.ok:
            raise CapabilityNotSupported(
                f"VM '{vm.name}' cannot be protected back to '{new_target}': "
                + "; ".join(verdict.problems)
            )
        new = ProtectionInfo(old.id, vm, new_source, new_target)
        if is_native(policy):  # the platform replicates back: no seed, no copy by standby
            replication_of(target, policy, new_target).reverse(new, engine.source(new_source))
            seed_ref = None
        else:
            seed_ref = target.seed(new, old.vm)
        with engine.state.session() as s:
            prot = engine.state.protection(s, vm_key)
            _swap(s, prot, old, vm, verdict, new_source, new_target)
            if seed_ref is not None:
                used = s.get(RecoveryPoint, used_id)
                assert used is not None
                # A target may seed with data it cannot vouch for ("exact": False): the engine
                # then reads it back before deciding what to ship.
                exact = fo_kind == "planned" and seed_ref.get("exact", True) is not False
                _add_seed(s, prot, used, seed_ref, vm, exact=exact)
            fo = active_real(s, prot)
            fo.state = "reprotected"
            fo.finished_at = datetime.now(UTC)
            engine.state.log(
                s,
                "reprotect",
                f"{vm.name} re-protected: {new_source} -> {new_target}, seeded from "
                + ("the original disks" if seed_ref else "nothing (full copy)"),
                prot.id,
            )
            return prot


def _check_roles(engine: Engine, vm_name: str, new_source: str, new_target: str) -> None:
    """Both sites' plugins must be installed in the roles the reverse direction needs."""
    known = plugins.list_plugins()
    for site_name, role in ((new_source, "source"), (new_target, "target")):
        plugin = engine.site(site_name).plugin
        if not any(p.name == plugin and p.role == role for p in known):
            raise CapabilityNotSupported(
                f"site '{site_name}' (plugin {plugin}) cannot be a replication {role}; "
                f"re-protecting {vm_name} from it is not supported"
            )


def _swap(
    s: Session,
    prot: Protection,
    old: ProtectionInfo,
    vm: VMSpec,
    verdict: Validation,
    new_source: str,
    new_target: str,
) -> None:
    """Retire the old direction's points and tokens; the protection points the other way."""
    for p in prot.points:
        if p.state in ("visible", "seed", "pruning"):
            p.state = "retired"
    for t in s.scalars(select(ChangeToken).where(ChangeToken.protection_id == prot.id)):
        s.delete(t)
    prot.home_site = prot.home_site or old.source_site
    prot.source_site, prot.target_site = new_source, new_target
    prot.vm_id, prot.spec, prot.target_size = vm.id, vm.to_dict(), verdict.size
    prot.generation += 1
    prot.state = "protected"
    prot.health, prot.health_reason = "ok", ""


def _add_seed(
    s: Session,
    prot: Protection,
    used: RecoveryPoint,
    ref: dict[str, Any],
    vm: VMSpec,
    exact: bool,
) -> None:
    """A `seed` point: the original disks, known exactly after a planned failover (the final
    point's manifest), block by block unknown after an unplanned one (read back and hashed)."""
    cycle = Cycle(
        protection_id=prot.id,
        status="complete",
        phase="done",
        kind="seed",
        snapshot_at=used.created_at,
        finished_at=datetime.now(UTC),
    )
    s.add(cycle)
    s.flush()
    point = RecoveryPoint(
        protection_id=prot.id,
        cycle_id=cycle.id,
        created_at=used.created_at,
        consistency=used.consistency,
        state="seed",
        ref=ref,
        notes="re-protect seed: the original disks",
    )
    s.add(point)
    s.flush()
    used_disks = {d.disk: d for d in used.disks}
    for disk in vm.disks:
        m = Manifest(disk.size)
        src = used_disks.get(disk.name)
        if exact and src is not None:
            m = Manifest.from_blob(src.size, src.manifest)
            m.resize(disk.size)
        else:
            m.invalidate([(0, disk.size)])
        s.add(
            PointDisk(
                point_id=point.id,
                disk=disk.name,
                size=disk.size,
                block_size=BLOCK,
                manifest=m.to_blob(),
                digest=m.digest(),
            )
        )
