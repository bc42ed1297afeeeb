#!/usr/bin/env bash
# A recovery plan end to end on embedded defaults: six throwaway VMs in three groups
# (database -> app -> web) are protected from a "source host" to a "DR host"; the plan is
# checked, previewed and drilled (with a manual step acknowledged from another command and a
# health check), then failed over for real (planned, zero loss), committed, re-protected,
# failed back home and re-protected again. Everything lives under ./demo-work/plan.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${STANDBY_DEMO_DIR:-$PWD/demo-work}/plan
export STANDBY_HOME="$W/home"
SRC="qemu:///embed?root=$W/src-host"
DR="qemu:///embed?root=$W/dr-host"
standby() { uv run --no-sync standby "$@"; }
lab() { uv run --no-sync python -m standby.plugins.physical.lab "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
MiB=1048576
VMS="erp-db1 erp-db2 erp-app1 erp-app2 erp-web1 erp-web2"
last_run() { standby plan runs --json | uv run --no-sync python -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])'; }

step "fresh demo directory $W"
if [ -d "$W" ]; then
  lab --uri "$SRC" destroy $VMS >/dev/null 2>&1 || true
  lab --uri "$DR" destroy $VMS >/dev/null 2>&1 || true
  rm -rf "$W"
fi
mkdir -p "$W/home/policies"

step "six VMs on the source host, protected to the DR host"
standby sites add src --plugin physical --set uri="\"$SRC\"" --set pool_dir="\"$W/src-pool\"" \
  --set domain_type='"qemu"'
standby sites add dr --plugin physical --set uri="\"$DR\"" --set pool_dir="\"$W/dr-pool\"" \
  --set domain_type='"qemu"'
# these VMs have no OS to answer an ACPI shutdown: a planned failover powers them off after 2s
printf 'rpo = "5m"\nretain = 3\nshutdown_timeout = "2s"\n' > "$W/home/policies/demo.toml"
i=0
for vm in $VMS; do
  i=$((i + 1))
  lab --uri "$SRC" create "$vm" --dir "$W/src-disks" --disk vda:64 >/dev/null
  lab --uri "$SRC" write "$vm" vda 0 $((1*MiB)) --pattern $((0x10 + i))
  standby protect "$vm" --from src --to dr --policy demo >/dev/null
  standby replicate "$vm" >/dev/null
done
standby status

step "a health endpoint for the database group (stands in for the database port)"
PORT=$(uv run --no-sync python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
uv run --no-sync python -m http.server --bind 127.0.0.1 "$PORT" >/dev/null 2>&1 &
HTTP=$!
trap 'kill $HTTP 2>/dev/null || true' EXIT

step "the plan file"
cat > "$W/erp.toml" <<TOML
name = "erp"
description = "ERP: database, then application servers, then web"

[[before]]
type = "script"
command = "echo \"\$(date -u +%T) \$STANDBY_PLAN \$STANDBY_KIND run \$STANDBY_RUN starts\" >> actions.log"

[[groups]]
name = "database"
vms = ["erp-db1", "erp-db2"]
  [[groups.before]]
  type = "manual"
  message = "DBA: confirm the database may start at the DR site"
  [[groups.after]]
  type = "wait"
  tcp = $PORT
  host = "127.0.0.1"
  timeout = "30s"
  interval = 1

[[groups]]
name = "app"
vms = ["erp-app1", "erp-app2"]
  [[groups.after]]
  type = "script"
  command = "echo \"\$(date -u +%T) app servers up: \$STANDBY_VM\" >> actions.log"
  timeout = "30s"

[[groups]]
name = "web"
vms = ["erp-web1", "erp-web2"]
TOML
cat "$W/erp.toml"
standby plan check "$W/erp.toml"
standby plan show "$W/erp.toml" --kind drill

step "drill: it stops at the manual step; an operator acknowledges it from another shell"
standby drill "$W/erp.toml" --no-wait
RUN=$(last_run)
standby plan ack "$RUN" g0.before.0
standby plan resume "$RUN"
uv run --no-sync python - "$STANDBY_HOME/reports/drill-$RUN.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"drill report {sys.argv[1]} (+ .html): plan RTO {r['rto_seconds']:.1f}s")
for v in r["vms"]:
    print(f"  {v['vm']:9} point {v['point_id']} age {v['rpo_seconds']:.0f}s  running after "
          f"{v['time_to_running_seconds']:.1f}s  healthy after {v['recovered_seconds']:.1f}s")
PY
lab --uri "$DR" list

step "the guests write; then a planned failover of the whole plan (zero data loss)"
lab --uri "$SRC" write erp-db1 vda $((8*MiB)) 65536 --pattern 0x77
standby plan failover "$W/erp.toml" --planned --no-wait
RUN=$(last_run)
standby plan ack "$RUN" g0.before.0
standby plan resume "$RUN"
lab verify "$(lab --uri "$DR" disk erp-db1 vda)" $((8*MiB)):65536:0x77 0:$((1*MiB)):0x11
lab --uri "$DR" list

step "commit, then re-protect back to the source host (seeded from the original disks)"
standby plan commit "$W/erp.toml"
standby plan reprotect "$W/erp.toml"
lab --uri "$DR" write erp-db2 vda $((9*MiB)) 65536 --pattern 0x99
for vm in $VMS; do standby replicate "$vm"; done

step "fail back home (planned) and protect in the original direction again"
standby plan failback "$W/erp.toml" --no-wait
RUN=$(last_run)
standby plan ack "$RUN" g0.before.0
standby plan resume "$RUN"
lab verify "$(lab --uri "$SRC" disk erp-db2 vda)" $((9*MiB)):65536:0x99
standby plan commit "$W/erp.toml"
standby plan reprotect "$W/erp.toml"
for vm in $VMS; do standby replicate "$vm" >/dev/null; done
standby status
standby plan runs
echo "actions the plan's scripts logged:"; cat "$W/actions.log"

step "demo done"
lab --uri "$SRC" destroy $VMS >/dev/null
lab --uri "$DR" destroy $VMS >/dev/null 2>&1 || true
echo "State, plan, reports and replicas stay in $W (make demo-plan starts afresh)."
