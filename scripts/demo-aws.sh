#!/usr/bin/env bash
# AWS on local doubles: moto's server behind standby's EBS shim (the EBS direct APIs by AWS's
# rules), Azure (Azurite + the fake ARM), and an embedded libvirt host.
#   1. AWS -> Azure: an EC2 instance protected to Azure; cycles through EBS snapshots and
#      changed blocks; a drill in Azure's isolated network.
#   2. KVM -> AWS (what AWS Elastic Disaster Recovery sells): a VM protected to an EBS
#      snapshot chain; a drill in an isolated VPC; a planned failover to an EC2 instance;
#      re-protect AWS -> KVM seeded from the original disks; failback home.
# Everything lives under ./demo-work/aws.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${STANDBY_DEMO_DIR:-$PWD/demo-work}/aws
export STANDBY_HOME="$W/home"
SRC="qemu:///embed?root=$W/src-host"
# shellcheck source=scripts/demo-lib.sh
source scripts/demo-lib.sh
lab() { uv run --no-sync python -m standby.plugins.physical.lab "$@"; }
aws() { uv run --no-sync python tests/doubles/serve_aws.py "$1" --dir "$W/aws" "${@:2}"; }

step "fresh demo directory $W"
rm -rf "$W"
mkdir -p "$W" "$STANDBY_HOME/sites" "$STANDBY_HOME/policies"

step "the doubles: AWS (EC2 + EBS direct APIs, HTTPS) with an instance 'ec2app', and Azure"
bg uv run --no-sync python tests/doubles/serve_aws.py serve --dir "$W/aws" >"$W/aws.log" 2>&1
bg uv run --no-sync python tests/doubles/serve_azure.py --dir "$W/azure" >"$W/azure.log" 2>&1
wait_ready "$W/aws/ready" "$W/aws.log"
wait_ready "$W/azure/ready" "$W/azure.log"
cat "$W/aws.log" "$W/azure.log"
# shellcheck disable=SC1091
source "$W/aws/env"; source "$W/azure/env"  # the secrets the site files reference (env:...)

step "three sites (files as an operator writes them: TLS pinned, keys by env: reference)"
cp "$W/aws/site.toml" "$STANDBY_HOME/sites/aws.toml"
cp "$W/azure/site.toml" "$STANDBY_HOME/sites/azure.toml"
standby sites add src --plugin physical --set uri="\"$SRC\"" --set pool_dir="\"$W/src-pool\"" \
  --set domain_type='"qemu"'
cat "$STANDBY_HOME/sites/aws.toml"
standby sites check aws
# the demo's guests have no OS to answer a shutdown: a planned failover powers off after 2s
printf 'rpo = "15m"\nretain = 3\nshutdown_timeout = "2s"\n' > "$STANDBY_HOME/policies/demo.toml"

step "1. AWS -> Azure: protect the EC2 instance ec2app (t3.small, two EBS volumes)"
standby vms aws
standby protect ec2app --from aws --to azure --policy demo
standby replicate ec2app
step "the instance writes; the next cycle lists the changed blocks between two EBS snapshots"
aws write ec2app xvda $((300*MiB)) 65536 0x33
aws write ec2app sdf $((10*MiB)) 4096 0x34
standby replicate ec2app --json > "$W/inc.json"
uv run --no-sync python - "$W/inc.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))[0]
print(f"{r['kind']} cycle: read {r['bytes_read']} bytes (two 512 KiB EBS blocks), "
      f"wrote {r['bytes_written']} to Azure")
PY
step "a drill of ec2app in Azure's isolated network, then cleaned up"
standby failover ec2app --test
standby failover cleanup ec2app

step "2. KVM -> AWS: a throwaway VM 'app03' on the source host (2 qcow2 disks), running"
lab --uri "$SRC" create app03 --dir "$W/src-disks" --disk vda:256 --disk vdb:64
lab --uri "$SRC" write app03 vda $((1*MiB)) $((8*MiB)) --pattern 0x11
lab --uri "$SRC" write app03 vdb 0 $((2*MiB)) --pattern 0x22
step "protect app03 to AWS: the instance type chosen from describe_instance_types"
standby protect app03 --from src --to aws --policy demo
standby replicate app03
lab --uri "$SRC" write app03 vda $((100*MiB)) 65536 --pattern 0x33
standby replicate app03
standby points app03

step "a drill in an isolated VPC (made by standby: no internet gateway, no peering)"
standby failover app03 --test
standby failover cleanup app03
standby cost app03

step "a real, planned failover to AWS: app03 shut down, final cycle, an EC2 instance launched"
lab --uri "$SRC" write app03 vda $((200*MiB)) 65536 --pattern 0x77   # just before: not lost
standby failover app03 --planned
aws has app03 xvda $((200*MiB)) 65536 0x77
aws same app03 xvda "$(lab --uri "$SRC" disk app03 vda)"
standby commit app03

step "re-protect: AWS -> home, layered on app03's original disks (still there, shut off)"
standby reprotect app03
aws write app03 xvda $((150*MiB)) 65536 0x99   # app03 works in AWS
standby replicate app03 --json > "$W/back.json"
uv run --no-sync python - "$W/back.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))[0]
print(f"{r['kind']} cycle: read {r['bytes_read']} bytes from EBS, wrote {r['bytes_written']} home")
PY

step "failback: the instance stopped, a final cycle of changed blocks, app03 starts at home"
standby failback app03
HOME_VDA=$(lab --uri "$SRC" disk app03 vda)
lab verify "$HOME_VDA" "$((150*MiB)):65536:0x99" "$((200*MiB)):65536:0x77"
echo "the write made in AWS and the last write before the failover are both at home"
standby commit app03
standby status

step "demo done"
lab --uri "$SRC" destroy app03
echo "State stays in $W for a look; the doubles stop now (make demo-aws starts afresh)."
