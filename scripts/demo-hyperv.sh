#!/usr/bin/env bash
# Hyper-V on local doubles: a Hyper-V host (the WinRM double running standby's PowerShell
# against real VHDX files, which Samba serves over SMB 3), a KVM DR host (embedded libvirt)
# and Azure (Azurite + the fake ARM).
#   1. Hyper-V -> KVM: protect, a full cycle, an RCT incremental, a drill, a planned failover
#      (the VM shut down through Hyper-V, a last cycle, started on the DR host), commit.
#   2. Hyper-V -> Azure: protect, cycles, a drill in Azure's isolated network, a planned
#      failover, commit.
#   3. VMM cloud -> VMM cloud (one VMM double managing two Hyper-V host doubles): protect
#      the whole cloud in one command, cycles, a drill, a planned failover placed on the DR
#      cloud's host and adopted on its VM network, re-protect back, failback onto the
#      original VM.
# Everything lives under ./demo-work/hyperv.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${STANDBY_DEMO_DIR:-$PWD/demo-work}/hyperv
export STANDBY_HOME="$W/home"
# shellcheck source=scripts/demo-lib.sh
source scripts/demo-lib.sh
hv() { uv run --no-sync python tests/doubles/serve_hyperv.py "$@"; }
field() { uv run --no-sync python -c 'import json,sys; d=json.load(open(sys.argv[1])); [d:=d[k] for k in sys.argv[2:]]; print(d)' "$@"; }

step "fresh demo directory $W"
rm -rf "$W"
mkdir -p "$W" "$STANDBY_HOME/sites" "$STANDBY_HOME/policies"

step "the doubles: two Hyper-V hosts (3 VMs with 64 MiB VHDX disks on hv-a, none on hv-b), a VMM server managing both, Azure"
bg uv run --no-sync python tests/doubles/serve_hyperv.py serve --dir "$W/hv" --vms 3 \
  --disk-mb 64 >"$W/hv.log" 2>&1
bg uv run --no-sync python tests/doubles/serve_azure.py --dir "$W/azure" >"$W/azure.log" 2>&1
wait_ready "$W/hv/ready.json" "$W/hv.log"
wait_ready "$W/azure/ready" "$W/azure.log"
cat "$W/hv.log" "$W/azure.log"
# shellcheck disable=SC1091
source "$W/hv/env"; source "$W/azure/env"  # the secrets the site files reference

step "three sites: the Hyper-V host (WinRM over HTTPS, certificate pinned, NTLM with message encryption; SMB 3 for the disks), a KVM DR host, Azure"
cp "$W/hv/site.toml" "$STANDBY_HOME/sites/hv.toml"
cp "$W/azure/site.toml" "$STANDBY_HOME/sites/azure.toml"
standby sites add dr --plugin physical --set uri="\"qemu:///embed?root=$W/dr-host\"" \
  --set pool_dir="\"$W/dr-pool\"" --set domain_type='"qemu"'
cat "$STANDBY_HOME/sites/hv.toml"
standby sites check hv
# the double's VMs have no integration services: a planned failover turns them off after 2 s
printf 'rpo = "15m"\nretain = 3\nshutdown_timeout = "2s"\n' > "$STANDBY_HOME/policies/demo.toml"
standby vms hv

VM=web01
step "1. Hyper-V -> KVM: protect $VM, full sync (a checkpoint, its frozen VHDX read over SMB)"
hv write --dir "$W/hv" "$VM" $((1*MiB)) $((4*MiB)) --pattern 0x11
standby protect "$VM" --from hv --to dr --policy demo
standby replicate "$VM"
step "the guest writes; the next cycle asks Resilient Change Tracking what changed since the last point's RCT id"
hv write --dir "$W/hv" "$VM" $((40*MiB)) 65536 --pattern 0x22
standby replicate "$VM" --json | uv run --no-sync python -c 'import json,sys; r=json.load(sys.stdin)[0]; print(r["kind"], "cycle: read", r["bytes_read"], "bytes, wrote", r["bytes_written"])'
standby points "$VM"
hv write --dir "$W/hv" "$VM" $((60*MiB)) 65536 --pattern 0x66   # after the point

step "drill: $VM-test on the DR host, on an isolated network"
standby failover "$VM" --test --json > "$W/drill.json"
DRILL="$(field "$W/drill.json" ref dir)/scsi0-0.qcow2"
qemu-io -U -r -f qcow2 -c "read -P 0x22 $((40*MiB)) 65536" "$DRILL" | head -n 1
qemu-io -U -r -f qcow2 -c "read -P 0x00 $((60*MiB)) 65536" "$DRILL" | head -n 1
echo "the drill VM holds the point: the write made after it is not there"
standby failover cleanup "$VM"

step "planned failover: $VM turned off through Hyper-V, a final cycle, $VM starts on the DR host"
standby failover "$VM" --planned --json > "$W/planned.json"
hv check --dir "$W/hv" "$VM" "$(field "$W/planned.json" ref dir)/scsi0-0.qcow2"   # DR == prod
standby commit "$VM"

VM2=app01
step "2. Hyper-V -> Azure: protect $VM2, full sync, an incremental, a drill in Azure's isolated network"
hv write --dir "$W/hv" "$VM2" 0 $((2*MiB)) --pattern 0x31
standby protect "$VM2" --from hv --to azure --policy demo
standby replicate "$VM2"
hv write --dir "$W/hv" "$VM2" $((30*MiB)) 65536 --pattern 0x32
standby replicate "$VM2"
standby failover "$VM2" --test
standby failover cleanup "$VM2"
step "planned failover to Azure (the last write before it is not lost), commit"
hv write --dir "$W/hv" "$VM2" $((20*MiB)) 65536 --pattern 0x77
standby failover "$VM2" --planned
standby commit "$VM2"
standby status

VM3=db01
step "3. VMM: two clouds of one (geo-clustered) VMM server, Gold (host hv-a) and DR (host hv-b)"
cp "$W/hv/vmm-prod.toml" "$STANDBY_HOME/sites/vmm-prod.toml"
cp "$W/hv/vmm-dr.toml" "$STANDBY_HOME/sites/vmm-dr.toml"
cat "$STANDBY_HOME/sites/vmm-dr.toml" | sed -n '1,12p'
standby sites check vmm-dr
standby vms vmm-prod
step "protect every VM of cloud Gold still unprotected, in one command ($VM and $VM2 already are)"
hv write --dir "$W/hv" "$VM3" 0 $((3*MiB)) --pattern 0x41
standby protect --all --from vmm-prod --to vmm-dr --policy demo
standby replicate "$VM3"
hv write --dir "$W/hv" "$VM3" $((10*MiB)) 65536 --pattern 0x42
standby replicate "$VM3"
step "drill in cloud DR: $VM3-test on hv-b's private switch, on no VM network"
standby failover "$VM3" --test
standby failover cleanup "$VM3"
step "planned failover to cloud DR: placed on hv-b, adopted by VMM on VM network DR-Prod"
standby failover "$VM3" --planned
hv same --dir "$W/hv" "$VM3" hv-a.corp hv-b.corp
standby commit "$VM3"
step "re-protect cloud DR -> cloud Gold (seeded from the original VHDX); the VM writes at the DR site"
standby reprotect "$VM3"
hv write --dir "$W/hv" --host hv-b.corp "$VM3" $((20*MiB)) 65536 --pattern 0x99
standby replicate "$VM3" --json | uv run --no-sync python -c 'import json,sys; r=json.load(sys.stdin)[0]; print(r["kind"], "cycle back: wrote", r["bytes_written"], "bytes")'
step "failback onto the original VM in cloud Gold"
standby failback "$VM3"
hv same --dir "$W/hv" "$VM3" hv-a.corp hv-b.corp
standby commit "$VM3"
standby status

step "demo done"
echo "Also there: Hyper-V Replica as the mover (replication = \"hyperv-replica\", docs/hyperv.md)."
echo "State stays in $W for a look; the doubles stop now (make demo-hyperv starts afresh)."
