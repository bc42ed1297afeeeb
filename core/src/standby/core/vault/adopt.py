"""A vault seen from a machine: its inventory, importing its protections into this machine's
state (a vault opened on a new machine), and one disk of a point written to a local file."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from standby.core.config import Policy, get_site
from standby.core.errors import ConfigError, NotFound, PluginError
from standby.core.extents import BLOCK, Manifest
from standby.core.model import Extent, VMSpec

from .gc import point_maps
from .target import assemble
from .vault import Vault, pack_name, retried


def _points(vault: Vault, tag: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for rid in vault.record_ids("points", f"{tag}/"):
        rows.append((int(rid.rsplit("/", 1)[1]), vault.get_record("points", rid)))
    return sorted(rows, key=lambda r: r[0])


def inventory(vault: Vault) -> dict[str, Any]:
    """Every protected VM with its points, and the vault's sizes."""
    vms, logical = [], 0
    for tag in vault.record_ids("protections"):
        prot = vault.get_record("protections", tag)
        points = []
        newest = 0
        for pid, rec in _points(vault, tag):
            size = sum(m.mapped_bytes() for m in point_maps(vault, rec).values())
            logical += size
            newest = size
            taken = (rec.get("meta") or {}).get("taken_at")
            points.append({"point": pid, "taken_at": taken, "logical": size})
        vms.append({"name": prot["vm"]["name"], "id": prot["vm"]["id"],
                    "source_site": prot["source_site"], "points": points,
                    "logical": newest})  # fmt: skip
    vault.load_index(force=True)
    packs = vault.record_ids("index")
    stored = sum(retried(vault.store.size)(pack_name(p)) for p in packs)
    chunk_bytes = sum(a.length for a in vault.index.values())
    return {
        "vault": vault.name,
        "vms": vms,
        "packs": len(packs),
        "chunks": len(vault.index),
        "chunk_bytes": chunk_bytes,
        "stored_bytes": stored,
        "logical_bytes": logical,
        "ratio": round(logical / stored, 2) if stored else 0.0,
    }


def adopt(home: Path, name: str, site_name: str) -> list[str]:
    """Record the vault's protections and points here, protected into site `site_name` (a
    vault site for `name`), so `standby failover` works on this machine."""
    from standby.core.engine.engine import open_state
    from standby.core.state import Cycle, PointDisk, Protection, RecoveryPoint

    site = get_site(site_name, home)
    if site.plugin != "vault" or site.raw.get("vault") != name:
        raise ConfigError(f"site '{site_name}' is not a site of vault '{name}'")
    vault = Vault.opened(name, home)
    state = open_state(home)
    lines = []
    try:
        for tag in vault.record_ids("protections"):
            rec = vault.get_record("protections", tag)
            vm = VMSpec.from_dict(rec["vm"])
            points = _points(vault, tag)
            with state.session() as s:
                if s.scalars(select(Protection).where(Protection.vm_name == vm.name)).first():
                    lines.append(f"{vm.name}: already protected here; left as it is")
                    continue
                prot = Protection(vm_id=vm.id, vm_name=vm.name, source_site=rec["source_site"],
                                  target_site=site_name, policy=Policy().model_dump(),
                                  spec=vm.to_dict(), home_site=rec["source_site"])  # fmt: skip
                s.add(prot)
                s.flush()
                for pid, prec in points:
                    meta = prec.get("meta") or {}
                    taken = meta.get("taken_at") or prec["committed_at"]
                    at = datetime.fromisoformat(taken)
                    cycle = Cycle(protection_id=prot.id, status="complete", phase="done",
                                  kind="imported", started_at=at, snapshot_at=at,
                                  finished_at=datetime.now(UTC))  # fmt: skip
                    s.add(cycle)
                    s.flush()
                    point = RecoveryPoint(protection_id=prot.id, cycle_id=cycle.id,
                                          created_at=at, consistency=meta.get("consistency",
                                          "crash"), ref={"vault": name, "vm": tag, "point": pid},
                                          notes=f"imported from vault '{name}'")  # fmt: skip
                    s.add(point)
                    s.flush()
                    for d in vm.disks:
                        m = Manifest(d.size)
                        m.invalidate([(0, d.size)])
                        s.add(PointDisk(point_id=point.id, disk=d.name, size=d.size,
                                        block_size=BLOCK, manifest=bytes(m.data),
                                        digest="imported"))  # fmt: skip
                lines.append(f"{vm.name}: imported with {len(points)} point(s) into site "
                             f"'{site_name}'")  # fmt: skip
    finally:
        state.dispose()
    return lines


def restore_disk_file(vault: Vault, vm_key: str, disk: str, point: int | None, out: Path,
                      fmt: str) -> tuple[int, int]:  # fmt: skip
    """One disk of a point as a local raw/qcow2/VHDX file; returns (point id, disk size)."""
    tag = None
    for t in vault.record_ids("protections"):
        rec = vault.get_record("protections", t)
        if vm_key in (rec["vm"]["name"], rec["vm"]["id"]):
            tag = t
    if tag is None:
        raise NotFound(f"vault '{vault.name}' holds no VM '{vm_key}'")
    points = _points(vault, tag)
    chosen = [p for p in points if point is None or p[0] == point]
    if not chosen:
        raise NotFound(f"vault '{vault.name}' has no point {point} of VM '{vm_key}'")
    pid, rec = chosen[-1]
    maps = point_maps(vault, rec)
    if disk not in maps:
        raise NotFound(f"point {pid} of '{vm_key}' has no disk '{disk}' (disks: "
                       f"{', '.join(sorted(maps))})")  # fmt: skip
    m = maps[disk]
    raw = out if fmt == "raw" else out.with_name(out.name + ".raw.tmp")
    with open(raw, "wb") as f:
        f.truncate(m.size)
        for slot in sorted(m.slots):
            lo, hi = slot * m.chunk, min((slot + 1) * m.chunk, m.size)
            f.seek(lo)
            f.write(assemble(Extent(lo, hi - lo), list(m.pieces(lo, hi)), vault.read_chunk))
    if fmt != "raw":
        try:
            # qemu-img calls VHD "vpc"; force_size keeps the disk's exact size (no CHS rounding)
            opts = ["-O", "vpc", "-o", "force_size=on"] if fmt == "vhd" else ["-O", fmt]
            subprocess.run(["qemu-img", "convert", "-f", "raw", *opts, str(raw), str(out)],
                           check=True, capture_output=True)  # fmt: skip
        except (OSError, subprocess.CalledProcessError) as exc:
            raise PluginError(f"qemu-img convert to {fmt} failed: {exc}") from exc
        finally:
            raw.unlink(missing_ok=True)
    return pid, m.size
