#!/usr/bin/env bash
# vSphere on local doubles: two vCenters (vcsim with standby's HTTPS front: CBT, datastore
# files, guest writes) and Azure (Azurite + the fake ARM).
#   1. VMware -> VMware (the SRM scenario): protect, cycles, a drill on the isolated port
#      group, a planned failover, re-protect back seeded from the original disks, failback
#      onto the original VM, and protected in the original direction again.
#   2. VMware -> Azure: protect, a drill, a planned failover, re-protect Azure -> vCenter,
#      failback onto the original VM.
# Everything lives under ./demo-work/vmware.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${STANDBY_DEMO_DIR:-$PWD/demo-work}/vmware
export STANDBY_HOME="$W/home"
# shellcheck source=scripts/demo-lib.sh
source scripts/demo-lib.sh
vc() { uv run --no-sync python tests/doubles/serve_vcsim.py "$@"; }

step "fresh demo directory $W"
rm -rf "$W"
mkdir -p "$W" "$STANDBY_HOME/sites" "$STANDBY_HOME/policies"

step "the doubles: production vCenter (2 VMs), DR vCenter (empty), Azure"
# prod is also where failbacks land: its site file names the datastore standby reaches as files
VC=(uv run --no-sync python tests/doubles/serve_vcsim.py)
bg "${VC[@]}" serve --dir "$W/prod" --vms 2 --disk-mb 128 --dr --env VC_PROD \
  --extra 'networks = { "default" = "DC0_DVPG0" }' >"$W/prod.log" 2>&1
bg "${VC[@]}" serve --dir "$W/dr" --vms 0 --dr --env VC_DR >"$W/dr.log" 2>&1
bg uv run --no-sync python tests/doubles/serve_azure.py --dir "$W/azure" >"$W/azure.log" 2>&1
wait_ready "$W/prod/ready.json" "$W/prod.log"
wait_ready "$W/dr/ready.json" "$W/dr.log"
wait_ready "$W/azure/ready" "$W/azure.log"
cat "$W/prod.log" "$W/dr.log" "$W/azure.log"
# shellcheck disable=SC1091
source "$W/prod/env"; source "$W/dr/env"; source "$W/azure/env"  # secrets the sites reference

step "three sites (files as an operator writes them: TLS pinned, passwords by env: reference)"
cp "$W/prod/site.toml" "$STANDBY_HOME/sites/prod.toml"
cp "$W/dr/site.toml" "$STANDBY_HOME/sites/dr.toml"
cp "$W/azure/site.toml" "$STANDBY_HOME/sites/azure.toml"
cat "$STANDBY_HOME/sites/dr.toml"
standby sites check prod
standby sites check dr
# the double's VMs have no VMware Tools: a planned failover powers them off after 2 s
printf 'rpo = "15m"\nretain = 3\nshutdown_timeout = "2s"\n' > "$STANDBY_HOME/policies/demo.toml"
standby vms prod

VM=DC0_C0_RP0_VM0
step "1. VMware -> VMware: protect $VM (validated: datastore space, port groups), full sync"
vc write --dir "$W/prod" "$VM" $((1*MiB)) $((4*MiB)) --pattern 0x11
standby protect "$VM" --from prod --to dr --policy demo
standby replicate "$VM"
step "the guest writes; the next cycle asks CBT what changed and ships only that"
vc write --dir "$W/prod" "$VM" $((40*MiB)) 65536 --pattern 0x22
standby replicate "$VM"
standby points "$VM"
vc write --dir "$W/prod" "$VM" $((60*MiB)) 65536 --pattern 0x66   # after the point

step "drill: $VM-test at the DR vCenter on port group standby-test (a vSwitch with no uplink)"
standby failover "$VM" --test --json | tee "$W/drill.json"
DRILL=$(uv run --no-sync python -c 'import json,sys; print(json.load(open(sys.argv[1]))["ref"]["files"]["disk2000"])' "$W/drill.json")
qemu-io -U -r -f raw -c "read -P 0x22 $((40*MiB)) 65536" "$DRILL" | head -n 1
qemu-io -U -r -f raw -c "read -P 0x00 $((60*MiB)) 65536" "$DRILL" | head -n 1
echo "the drill VM holds the point: the write made after it is not there"
standby failover cleanup "$VM"

step "planned failover: $VM shut down at prod, a final cycle, $VM starts at the DR vCenter"
standby failover "$VM" --planned
vc check --dir "$W/dr" "$VM" "$(vc file --dir "$W/prod" "$VM")"   # DR disk == prod disk
standby commit "$VM"
step "re-protect: DR -> prod, layered on the original VM's disks (shut down, still there)"
standby reprotect "$VM"
vc write --dir "$W/dr" "$VM" $((80*MiB)) 65536 --pattern 0x99    # the VM works at the DR site
standby replicate "$VM" --json | uv run --no-sync python -c 'import json,sys; r=json.load(sys.stdin)[0]; print(r["kind"], "cycle: wrote", r["bytes_written"], "bytes at prod")'
step "failback onto the original VM (same VM, same UUID; its disks switch to the point's)"
standby failback "$VM"
vc file --dir "$W/prod" "$VM"
vc check --dir "$W/prod" "$VM" "$(vc file --dir "$W/dr" "$VM")"   # prod disk == DR disk
standby commit "$VM"
standby reprotect "$VM"
standby replicate "$VM"

VM2=DC0_C0_RP0_VM1
step "2. VMware -> Azure: protect $VM2, full sync, a drill in Azure's isolated network"
vc write --dir "$W/prod" "$VM2" 0 $((2*MiB)) --pattern 0x31
standby protect "$VM2" --from prod --to azure --policy demo
standby replicate "$VM2"
standby failover "$VM2" --test
standby failover cleanup "$VM2"
step "planned failover to Azure, commit, re-protect Azure -> prod (seeded from the VMDK)"
vc write --dir "$W/prod" "$VM2" $((20*MiB)) 65536 --pattern 0x77   # just before: not lost
standby failover "$VM2" --planned
standby commit "$VM2"
standby reprotect "$VM2"
standby replicate "$VM2"
step "failback from Azure onto the original VM at prod"
standby failback "$VM2"
FLAT=$(vc file --dir "$W/prod" "$VM2")
qemu-io -U -r -f raw -c "read -P 0x77 $((20*MiB)) 65536" "$FLAT" | head -n 1
echo "the last write before the failover to Azure is in the disk $VM2 runs on again"
standby commit "$VM2"
standby reprotect "$VM2"   # towards Azure again: the stopped Azure VM goes, the replica seeds
standby replicate "$VM2"
standby status

step "demo done"
echo "State stays in $W for a look; the doubles stop now (make demo-vmware starts afresh)."
