"""`replication = "hyperv-replica"`: Hyper-V Replica does the copying, standby orchestrates.

Protect runs `Enable-VMReplication` on the primary host towards the DR host (its
`replica_server` name, port and authentication from the DR site file; the recovery history
from the policy's `retain`, at most 24; the frequency from the RPO: 30 s, 5 min or 15 min,
the largest at most half the RPO) and `Start-VMInitialReplication`. Each cycle asks the
primary for the relationship's state and health and the replica for its recovery points
(`Get-VMSnapshot -SnapshotType Replica`, plus the latest replication when it is newer), which
become the protection's points. Failover and drills go through `Start-VMFailover` (`-AsTest`
for a drill, `-Prepare` on the primary before a planned one), commit is
`Complete-VMFailover`, re-protect `Set-VMReplication -Reverse`.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from standby.core.errors import CapabilityNotSupported, ConfigError
from standby.core.interfaces import NativePoint, NativeReplication, NativeState, Source
from standby.core.model import FailoverResult, PointInfo, ProtectionInfo

from . import scripts
from .conn import PowerShell, as_list

if TYPE_CHECKING:
    from .target import HyperVTarget

KIND = "hyperv-replica"
HISTORY_MAX = 24  # Hyper-V keeps at most 24 recovery points


def frequency(rpo: int) -> int:
    """Hyper-V Replica's interval (30, 300 or 900 s): the largest at most half the RPO."""
    return next((f for f in (900, 300) if f * 2 <= rpo), 30)


def _primary(source: Source) -> PowerShell:
    from .source import HyperVSource

    if not isinstance(source, HyperVSource):
        raise CapabilityNotSupported(
            f"replication '{KIND}' needs a Hyper-V source site; '{source.site.name}' is "
            f"plugin {source.plugin_name}"
        )
    return source.ps


def _time(raw: Any) -> datetime:
    return datetime.fromisoformat(str(raw).replace("Z", "+00:00"))


class HyperVReplica(NativeReplication):
    """Hyper-V Replica between a primary host (the protection's source) and this DR host."""

    def __init__(self, target: HyperVTarget) -> None:
        self.target = target
        self.opts = target.opts

    def _server(self) -> dict[str, Any]:
        o = self.opts
        return {
            "Server": o.replica_server or o.host,
            "Port": o.replica_port,
            "Auth": o.replica_auth,
            "Thumbprint": o.replica_thumbprint,
        }

    def enable(self, protection: ProtectionInfo, source: Source, retain: int, rpo: int) -> None:
        ps = _primary(source)
        server = self.target.ps.run(scripts.script("replica-server", {}, scripts.REPLICA_SERVER))
        if not server or not server.get("ReplicationEnabled"):
            raise ConfigError(
                f"site '{self.target.site.name}' is not a Hyper-V Replica server "
                "(run Set-VMReplicationServer -ReplicationEnabled $true there)"
            )
        params = {
            "VMId": protection.vm.id, **self._server(),
            "History": min(retain, HISTORY_MAX), "Frequency": frequency(rpo),
        }  # fmt: skip
        ps.run(scripts.script("replica-enable", params, scripts.REPLICA_ENABLE))

    def sync(self, protection: ProtectionInfo, source: Source, final: bool) -> NativeState:
        ps = _primary(source)
        vm_id = protection.vm.id
        state = ps.run(
            scripts.script("replica-state", {"VMId": vm_id, "Final": final}, scripts.REPLICA_STATE)
        )
        held = self.target.ps.run(
            scripts.script("replica-points", {"VMId": vm_id}, scripts.REPLICA_POINTS)
        )
        health = str(state.get("Health", "Normal"))
        points = [
            NativePoint(
                ref={"native": KIND, "vm_id": vm_id, "snapshot": str(s["Id"])},
                taken_at=_time(s["CreationTime"]),
            )
            for s in as_list(held.get("Snapshots"))
        ]
        points.sort(key=lambda p: p.taken_at)
        last = held.get("LastReplicationTime")
        if last and (not points or _time(last) > points[-1].taken_at):
            points.append(
                NativePoint(
                    ref={"native": KIND, "vm_id": vm_id, "snapshot": None, "at": str(last)},
                    taken_at=_time(last),
                )
            )
        reason = "" if health == "Normal" else f"Hyper-V Replica health is {health}"
        return NativeState(
            state=str(state.get("State", "unknown")),
            healthy=health != "Critical",
            reason=reason,
            points=points,
        )

    def reverse(self, protection: ProtectionInfo, source: Source) -> None:
        params = {"VMId": protection.vm.id, **self._server()}
        _primary(source).run(scripts.script("replica-reverse", params, scripts.REPLICA_REVERSE))

    def disable(self, protection: ProtectionInfo, source: Source) -> None:
        params = {"VMId": protection.vm.id}
        _primary(source).run(scripts.script("replica-disable", params, scripts.REPLICA_DISABLE))
        self.target.ps.run(scripts.script("replica-disable", params, scripts.REPLICA_DISABLE))

    # ------------------------------------------------------------ the target's side

    def failover(
        self,
        protection: ProtectionInfo,
        point: PointInfo,
        test: bool,
        network: str | None,
        failover_id: int | None,
    ) -> FailoverResult:
        vm = protection.vm
        nics = [
            {
                "Mac": n.mac.replace(":", "").upper(),
                "Switch": network or self.opts.networks.get(n.network) or n.network,
            }
            for n in vm.nics
        ]
        params = {
            "VMId": vm.id, "Snapshot": point.ref.get("snapshot"), "Test": test,
            "TestSwitch": self.opts.test_switch, "Nics": nics,
        }  # fmt: skip
        answer = self.target.ps.run(
            scripts.script("replica-failover", params, scripts.REPLICA_FAILOVER)
        )
        name = str(answer.get("Name", vm.name))
        where = (
            f"Hyper-V Replica test failover on {self.opts.test_switch}"
            if test
            else "Hyper-V Replica failover"
        )
        return FailoverResult(
            ref={
                "native": KIND, "vm": name, "vm_id": vm.id, "failover_id": failover_id or 0,
                "kind": "test" if test else "real",
            },
            vm_name=name,
            summary=f"{name} running at '{self.target.site.name}' from point {point.id} ({where})",
        )  # fmt: skip

    def stop_test(self, protection: ProtectionInfo) -> None:
        params = {"VMId": protection.vm.id}
        self.target.ps.run(scripts.script("replica-stop-test", params, scripts.REPLICA_STOP_TEST))

    def complete(self, protection: ProtectionInfo) -> None:
        params = {"VMId": protection.vm.id}
        self.target.ps.run(scripts.script("replica-complete", params, scripts.REPLICA_COMPLETE))
