#!/usr/bin/env bash
# The main job on embedded defaults: a throwaway VM in one embedded libvirt (the "source
# host") is protected to a second embedded libvirt (the "DR host"), written to between cycles,
# test-failed-over, checked, and cleaned up. Everything lives under ./demo-work.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${STANDBY_DEMO_DIR:-$PWD/demo-work}
export STANDBY_HOME="$W/home"
SRC="qemu:///embed?root=$W/src-host"
DR="qemu:///embed?root=$W/dr-host"
standby() { uv run --no-sync standby "$@"; }
lab() { uv run --no-sync python -m standby.plugins.physical.lab "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
MiB=1048576

step "fresh demo directory $W"
if [ -d "$W" ]; then
  lab --uri "$SRC" destroy app01 >/dev/null 2>&1 || true
  lab --uri "$DR" destroy app01-test standby-replica-1 >/dev/null 2>&1 || true
  rm -rf "$W"
fi
mkdir -p "$W"

step "a throwaway VM 'app01' on the source host (2 qcow2 disks), running"
lab --uri "$SRC" create app01 --dir "$W/src-disks" --disk vda:512 --disk vdb:128
lab --uri "$SRC" write app01 vda $((1*MiB)) $((8*MiB)) --pattern 0x11
lab --uri "$SRC" write app01 vdb 0 $((2*MiB)) --pattern 0x22

step "two sites: the source host and the DR host"
standby sites add src --plugin physical --set uri="\"$SRC\""
standby sites add dr --plugin physical --set uri="\"$DR\"" --set pool_dir="\"$W/dr-pool\"" \
  --set domain_type='"qemu"'
standby plugins
standby sites check dr
standby vms src

step "protect app01 (RPO 5m, keep 3 points) and run the initial full sync"
standby protect app01 --from src --to dr --rpo 5m --retain 3
standby replicate app01

step "the guest writes; incremental cycles ship only what changed"
lab --uri "$SRC" write app01 vda $((100*MiB)) $((1*MiB)) --pattern 0x33
standby replicate app01
lab --uri "$SRC" write app01 vdb $((64*MiB)) 65536 --pattern 0x44
lab --uri "$SRC" write app01 vda $((200*MiB)) $((2*MiB)) --pattern 0x55
standby replicate app01
standby replicate app01

step "status and recovery points (retention keeps 3)"
standby status
standby points app01

step "a write after the last point: it must NOT appear in the failover"
lab --uri "$SRC" write app01 vda $((300*MiB)) 65536 --pattern 0x66

step "test failover to the DR host (isolated network, source untouched)"
standby failover app01 --test
lab --uri "$DR" list
FO="$W/dr-pool/1-app01/test-failover"
lab verify "$FO/vda.qcow2" $((1*MiB)):$((8*MiB)):0x11 $((100*MiB)):$((1*MiB)):0x33 \
  $((200*MiB)):$((2*MiB)):0x55 $((300*MiB)):65536:0x00
lab verify "$FO/vdb.qcow2" 0:$((2*MiB)):0x22 $((64*MiB)):65536:0x44

step "clean up the test failover: nothing it created is left"
standby failover cleanup app01
echo "domains left on the DR host (standby-replica-1 is the replication appliance, not the drill):"
lab --uri "$DR" list
[ ! -e "$FO" ] && echo "test-failover disks removed"

step "demo done"
standby status
lab --uri "$SRC" destroy app01
lab --uri "$DR" destroy standby-replica-1
echo "The demo's VMs are stopped; state and replicas stay in $W for a look (make demo starts afresh)."
